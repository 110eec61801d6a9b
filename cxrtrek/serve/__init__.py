"""The OpenAI-compatible model server (``cxrtrek serve``): any :class:`~cxrtrek.protocol.VLMBackend`
behind ``/v1/chat/completions``, dynamically batched. It imports the backends, never the agent
or the front ends."""
