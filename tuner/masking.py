"""Assistant-only labels for chat records: which tokens of a rendered conversation the loss sees.

The chat template renders the conversation; a token is trained on iff its characters lie inside an
assistant turn, i.e. between the prompt the template renders *before* that turn (with the
generation prompt) and the text it renders *through* it. That covers the turn's content and its
end-of-turn token (the model must learn to stop) and nothing of system or user turns. This needs
no ``{% generation %}`` markers, which SmolLM2's template (like most) does not have, and it works
for any template that renders a conversation as a prefix of its continuation (checked).
"""
from __future__ import annotations

from typing import Mapping, Sequence

IGNORE = -100   # label value the causal-LM loss skips (torch cross_entropy's ignore_index)


def assistant_spans(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return (text, character spans of the assistant turns).

    >>> text, spans = assistant_spans(tok, [{"role": "user", "content": "Hi"},
    ...                                     {"role": "assistant", "content": "Hello"}])   # doctest: +SKIP
    >>> text[spans[0][0]:spans[0][1]]                                                     # doctest: +SKIP
    'Hello<|im_end|>\\n'
    """
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation cannot start with an assistant turn")
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render a conversation as a prefix of its "
                             "continuation; assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_chat(tokenizer, messages: Sequence[Mapping[str, str]], *,
                  max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one conversation; labels are IGNORE outside assistant turns.

    Truncation keeps the start (the prompt), so a long answer is cut, never its question.

    >>> out = tokenize_chat(tok, msgs, max_length=256)      # doctest: +SKIP
    >>> sorted(out)                                         # doctest: +SKIP
    ['input_ids', 'labels']
    """
    text, spans = assistant_spans(tokenizer, messages)
    # The template already holds the special tokens; adding them again would double a BOS.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= start and end <= e for s, e in spans) and end > start
        labels.append(tid if inside else IGNORE)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": list(ids), "labels": labels}
