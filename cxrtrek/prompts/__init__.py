"""Prompts: the templates kept as files beside this module (rendered strictly by
:mod:`cxrtrek.prompts.render`), the one default system prompt, and the dialects
(:mod:`cxrtrek.prompts.dialects`: how a request becomes a model's chat, apart from the
transport).

:data:`DEFAULT_SYSTEM_PROMPT` is the system prompt of every chat in the CXRTrek dataset; the
graph sends it unless a run sets another, CXRTrekNet is trained with it, and the format writer
puts it in the records it writes.
"""

__all__ = ["DEFAULT_SYSTEM_PROMPT"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful radiology assistant to help radiologists analyze, interpret medical "
    "images and answer clinical questions."
)
