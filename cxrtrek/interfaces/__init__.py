"""The front ends: the command line (``cli``, typer), the interactive chat (``chat``), the
HTTP API (``api``: settings, uploads, runs, app) and the MCP server (``mcp``). They sit on
top: they import the agent, the backends, the model server and the evaluation; nothing
imports them."""
