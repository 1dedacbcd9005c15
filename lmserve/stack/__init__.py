"""`lmserve up`: a gateway and model servers on one machine, from one YAML."""
