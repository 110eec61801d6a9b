"""The agent facade (:class:`CXRTrekAgent`, the Python API) and its LangChain tool."""
