"""The agent: :class:`~cxrtrek.agent.agent.CXRTrekAgent` (the Python API of a reading), the
run store it keeps its runs in (:class:`~cxrtrek.agent.store.RunStore`: checkpoints and traces,
usable without a model) and its LangChain tool (:mod:`~cxrtrek.agent.subagent`)."""
