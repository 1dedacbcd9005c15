"""OpenAI's batch file formats (jsonl.py), shared by the gateway's Batch API and `lmserve batch run`."""
