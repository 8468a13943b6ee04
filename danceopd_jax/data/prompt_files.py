"""Prompt buckets read from a user's file: the data of a T2I route on a real model (e.g. SD3.5).

Two formats, by extension:

  ``.txt``    one prompt per line; blank lines and lines starting with ``#`` are skipped
  ``.jsonl``  one JSON object per line with a string ``"prompt"`` (other keys are ignored)

DanceOPD needs no target images for a T2I route (the student's own rollout makes the query
states), so a record is just ``{"prompt": str}``.
"""

import json
import os

BUCKET_KINDS: dict[str, frozenset[str]] = {"prompt_file": frozenset({"prompt"})}


class PromptFileError(ValueError):
    """A prompt file that is missing, empty or malformed; the message names the file and line."""


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path`` in file order (formats in the module docstring)."""
    if not os.path.isfile(path):
        raise PromptFileError(f"{path}: no such prompt file")
    kind = os.path.splitext(path)[1]
    if kind not in (".txt", ".jsonl"):
        raise PromptFileError(f"{path}: prompt files are .txt (one per line) or .jsonl ({{\"prompt\": ...}} per line)")
    prompts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is not part of the prompt
            except UnicodeDecodeError as error:
                raise PromptFileError(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start} of the line)") from None
            line = line.strip()
            if not line or (kind == ".txt" and line.startswith("#")):
                continue
            if kind == ".txt":
                prompts.append(line)
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                raise PromptFileError(f"{path}:{number}: expected a JSON object with a \"prompt\" string") from None
            if not isinstance(prompt, str):
                raise PromptFileError(f"{path}:{number}: \"prompt\" must be a string, got {type(prompt).__name__}")
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in the file")
    return prompts


class PromptFileSource:
    """Random-access records ``{"prompt": str}`` of a prompt file (all of it, or its first ``size``)."""

    def __init__(self, path: str, size: int = 0):
        prompts = read_prompts(path)
        if size > len(prompts):
            raise PromptFileError(f"{path}: bucket size {size} but the file has {len(prompts)} prompts")
        self.prompts = prompts[:size] if size else prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"prompt": self.prompts[index]}
