"""The model's chat template: found beside the model at compile time, rendered as transformers does.

An Instruct model answers well only when the conversation is laid out the way
it was trained (SmolLM2: ``<|im_start|>user\\n...<|im_end|>``); sent raw text it
often ends at once. `llc compile` copies the template into the build as
``chat_template.jinja``; `llc serve` and `llc run --chat` render it with jinja2
in a sandbox, with the same options and helpers as transformers'
``apply_chat_template`` (trim_blocks, lstrip_blocks, ``raise_exception``,
``strftime_now``), so the prompt tokens are the ones transformers would make.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llc.errors import LlcError

FILE = "chat_template.jinja"


def find_template(model_dir: Path) -> str | None:
    """The chat template beside a model: chat_template.jinja, tokenizer_config.json, or generation.json."""
    if (model_dir / FILE).is_file():
        return (model_dir / FILE).read_text()
    for name in ("tokenizer_config.json", "generation.json"):
        path = model_dir / name
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (ValueError, AttributeError):
                raise LlcError(path, "not a JSON object") from None
            if isinstance(template, str):
                return template
    return None


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special = {"bos_token": bos_token, "eos_token": eos_token}

    @staticmethod
    def of_build(build: Path, tokenizer) -> "ChatTemplate | None":
        path = Path(build) / FILE
        if not path.is_file():
            return None
        gen = Path(build) / "generation.json"
        ids = json.loads(gen.read_text()) if gen.is_file() else {}
        eos = ids.get("eos_token_ids") or []
        name = lambda i: (tokenizer.id_to_token(i) or "") if i is not None else ""  # noqa: E731
        return ChatTemplate(path.read_text(), name(ids.get("bos_token_id")), name(eos[0] if eos else None))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except jinja2.exceptions.TemplateError as e:
            raise LlcError(None, f"chat template: {e}") from None
