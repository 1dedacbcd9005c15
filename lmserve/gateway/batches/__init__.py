"""OpenAI's Files and Batch APIs on the gateway: storage (store.py), routes (api.py), execution (worker.py)."""
