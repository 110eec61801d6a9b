"""Retrieval and image tools the stages (and parent agents) call."""
