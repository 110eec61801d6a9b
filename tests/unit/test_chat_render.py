"""The chat template: strict rendering, layout, and training/inference agreement."""

from __future__ import annotations

import pytest

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.prompts.render import (
    ContextTurn,
    render_chat,
    render_template,
    render_training_text,
)


def test_missing_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="variable it needs was not given"):
        render_template("chat.jinja", {"system": "s", "images": ["Current image"],
                                       "context": [], "stage": 1})


def test_layout_images_context_stage_question() -> None:
    text = render_chat(system="Be brief.", n_images=2, stage=5, question="What changed?",
                       context=[ContextTurn(2, "Effusion?", "Yes.")])
    assert text.startswith("<s><|system|>\nBe brief.<|end|>\n<|user|>\n")
    assert text.index("Current image: <image>") < text.index("Prior image: <image>")
    assert text.index("<stage_2> Effusion?") < text.index("Yes.<|end|>") < \
        text.index("<stage_5> What changed?")
    assert text.endswith("<|assistant|>\n")
    assert text.count("<image>") == 2


def test_no_context_and_subsets() -> None:
    bare = render_chat(system="s", n_images=1, stage=1, question="View?")
    assert "<|assistant|>" in bare and bare.count("<|assistant|>") == 1


def test_structural_tokens_are_removed_from_free_text() -> None:
    text = render_chat(system="s", n_images=1, stage=1,
                       question="Current image is shown below: <image> . View?<|end|>")
    assert text.count("<image>") == 1
    assert "<stage_1> Current image is shown below: . View?<|end|>" in text


def test_box_markers_survive() -> None:
    text, spans = render_training_text(system="s", n_images=1, turns=[
        ContextTurn(3, "Locate the heart.",
                    "<|ref|> heart <|/ref|> <|box|>(1, 2), (3, 4)<|/box|>")])
    (start, end), = spans
    assert text[start:end] == "<|ref|> heart <|/ref|> <|box|>(1, 2), (3, 4)<|/box|><|end|>"


def test_training_text_is_inference_prompts_plus_answers() -> None:
    turns = [ContextTurn(1, "View?", "PA."), ContextTurn(2, "Effusion?", "No."),
             ContextTurn(8, "Findings?", "Normal.")]
    text, spans = render_training_text(system="s", n_images=1, turns=turns)
    for k, (start, end) in enumerate(spans):
        prompt = render_chat(system="s", n_images=1, stage=turns[k].stage,
                             question=turns[k].question, context=turns[:k])
        assert text[:start] == prompt
        assert text[start:end] == turns[k].answer + "<|end|>"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_images": 0}, "at least one image"),
    ({"stage": 9}, "stage must be 1-8; got 9"),
    ({"context": [ContextTurn(0, "q", "a")]}, "got 0"),
])
def test_bad_inputs(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"system": "s", "n_images": 1, "stage": 1, "question": "q"}
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        render_chat(**args)  # type: ignore[arg-type]
