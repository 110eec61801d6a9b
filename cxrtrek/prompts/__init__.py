"""Prompts: the templates kept as files beside this module (rendered strictly by
:mod:`cxrtrek.prompts.render`), the one default system prompt, and the dialects
(:mod:`cxrtrek.prompts.dialects`: how a request becomes a model's chat, apart from the
transport).

:data:`DEFAULT_SYSTEM_PROMPT` is the system prompt of every chat in the CXRTrek dataset; the
graph sends it unless a run sets another, CXRTrekNet is trained with it, and the format writer
puts it in the records it writes.
"""

__all__ = ["DEFAULT_SYSTEM_PROMPT", "DESCRIBE_QUESTION", "describe_question",
           "description_label", "is_description_question"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful radiology assistant to help radiologists analyze, interpret medical "
    "images and answer clinical questions."
)

DESCRIBE_QUESTION = "List every finding kind of this image, with its side, zone, grade and box."
"""The question of an image's description: asked of each image alone by describe-then-answer
(``RunSettings.describe``), and trained with CXRTrekNet's canonical descriptions."""


def describe_question(label: str | None = None) -> str:
    """The description question as a context turn names its image: :data:`DESCRIBE_QUESTION`
    when the prompt shows one image; with ``label`` (``Current image``, ``Prior image``) when it
    shows several."""
    if label is None:
        return DESCRIBE_QUESTION
    return DESCRIBE_QUESTION.replace("this image", f"the {label[:1].lower()}{label[1:]}")


_DESCRIBE_HEAD, _DESCRIBE_TAIL = DESCRIBE_QUESTION.split("this image", 1)


def is_description_question(text: str) -> bool:
    """Whether a context pair's question is an image's description question (any label):
    a backend that must shorten a prompt keeps those pairs and drops earlier stages' first."""
    return text.startswith(_DESCRIBE_HEAD.rstrip())


def description_label(question: str) -> str | None:
    """The image label that a description question names (``Current image``): the inverse of
    :func:`describe_question`; ``None`` for the one-image question or any other text."""
    head = _DESCRIBE_HEAD + "the "
    if not (question.startswith(head) and question.endswith(_DESCRIBE_TAIL)):
        return None
    name = question[len(head):len(question) - len(_DESCRIBE_TAIL)]
    return name[:1].upper() + name[1:] or None
