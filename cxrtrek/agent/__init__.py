"""The agent facade, VLM backends, sub-agent adapters and the command line."""
