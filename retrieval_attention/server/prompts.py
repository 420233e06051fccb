"""Prompt token ids for requests, with and without a persistent context.

The rule for **chat contexts** (shared by the server and ``generate --save-context/--load-context``):

* Creating a context from document ``D`` (optionally with a system message ``S``) renders the chat template
  over ``[S?] + [user: D + SENTINEL]`` and cuts the text just before the sentinel. The context's tokens are
  the tokenisation of that text: the template's prefix up to the start of the user's turn, then ``D``.
* A chat request on the context renders the template over its own messages in which the **first user
  message's content** ``C`` is replaced by ``SENTINEL + separator + C`` (``separator`` is fixed when the
  context is created, default ``"\\n\\n"``), with ``add_generation_prompt=True``. The text after the sentinel
  (separator, ``C``, the end of that turn, any later turns and the assistant header) is tokenised and appended
  to the context's tokens. The text before the sentinel must equal the context's template prefix.
* So the model sees exactly the template rendering of the conversation whose first user message is
  ``D + separator + C``: the same text as a plain request would send. Its tokens are the same as a plain
  request's whenever the tokenizer splits the text at the end of ``D`` (true for BPE / SentencePiece /
  word-level tokenizers when ``D`` ends with a non-space character and the separator starts with whitespace).
* System messages: the context's ``S`` is used; a request may repeat it or leave it out, but a different
  system message is an error (it would have to come before the document). A request must have a user
  message (after any system message) as the first turn.

**Completion contexts** (``mode: "completion"``, or contexts made from token ids): the context's tokens are
``tokenizer(D)`` (with the tokenizer's special tokens, e.g. BOS); a completion request's prompt is tokenised
without special tokens (or taken as token ids) and appended. No separator is inserted.
"""

from __future__ import annotations

import threading

from .errors import bad_request

SENTINEL = "<<<retrieval-attention:context-end:7f3a91>>>"


class PromptBuilder:
    """Tokenizer front end used by the server (one lock around every tokenizer call: fast tokenizers are not
    safe to mutate from several threads)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lock = threading.RLock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # ---- basic --------------------------------------------------------------------------------------------
    def encode(self, text: str, special: bool) -> list[int]:
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.has_chat_template:
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions",
                              param="messages", code="no_chat_template")
        with self.lock:
            try:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the client's input
                raise bad_request(f"the chat template rejected the messages: {e}", param="messages",
                                  code="invalid_messages") from e

    # ---- plain requests ------------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Same as :func:`retrieval_attention.generation.encode_prompt`: template text, no extra special tokens."""
        return self.encode(self.render(messages, True), special=False)

    def completion_ids(self, prompt, param: str = "prompt") -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt, special=True)
        if not ids:
            raise bad_request("the prompt is empty", param=param, code="invalid_value")
        self.check_ids(ids, param)
        return ids

    def check_ids(self, ids: list[int], param: str) -> None:
        n = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < n]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{n - 1})", param=param,
                              code="invalid_value")

    # ---- contexts -----------------------------------------------------------------------------------------
    def _cut(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, str]:
        text = self.render(messages, add_generation_prompt)
        if text.count(SENTINEL) != 1:
            raise bad_request("the chat template does not render message content verbatim; use mode 'completion'",
                              param="mode", code="unsupported_template")
        i = text.index(SENTINEL)
        return text[:i], text[i + len(SENTINEL) :]

    def chat_context(self, document: str, system: str | None) -> tuple[list[int], str]:
        """``(token ids, template prefix)`` of a chat context over ``document`` (see the module docstring)."""
        head = [{"role": "system", "content": system}] if system is not None else []
        prefix_text, _ = self._cut(head + [{"role": "user", "content": document + SENTINEL}], False)
        template_prefix, _ = self._cut(head + [{"role": "user", "content": SENTINEL}], False)
        if not prefix_text.startswith(template_prefix) or not prefix_text[len(template_prefix):]:
            raise bad_request("the chat template changes the document text; use mode 'completion'", param="mode",
                              code="unsupported_template")
        ids = self.encode(prefix_text, special=False)
        if not ids:
            raise bad_request("the context text is empty", param="text", code="invalid_value")
        return ids, template_prefix

    def chat_tail(self, messages: list[dict], *, system: str | None, separator: str, template_prefix: str,
                  context_id: str) -> list[int]:
        """Tokens a chat request appends to a chat context (see the module docstring)."""
        msgs = [dict(m) for m in messages]
        req_system = [m["content"] for m in msgs[:1] if m["role"] == "system"]
        if any(m["role"] == "system" for m in msgs[1:]):
            raise bad_request("with a context_id only a leading system message is allowed", param="messages",
                              code="invalid_messages")
        if req_system:
            if system is None or req_system[0] != system:
                raise bad_request(
                    f"context {context_id} was created "
                    + ("without a system message" if system is None else "with another system message")
                    + "; leave the system message out (or repeat the context's one exactly)",
                    param="messages", code="context_system_mismatch",
                )
            msgs = msgs[1:]
        if not msgs or msgs[0]["role"] != "user":
            raise bad_request("with a context_id the first message (after the system message) must be a user message",
                              param="messages", code="invalid_messages")
        msgs[0]["content"] = SENTINEL + separator + msgs[0]["content"]
        head = [{"role": "system", "content": system}] if system is not None else []
        before, after = self._cut(head + msgs, True)
        if before != template_prefix:
            raise bad_request(f"the chat template renders the start of context {context_id} differently for these "
                              "messages", param="messages", code="invalid_messages")
        ids = self.encode(after, special=False)
        if not ids:
            raise bad_request("the request adds no tokens to the context", param="messages", code="invalid_value")
        return ids

    def completion_tail(self, prompt, param: str = "prompt") -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt, special=False)
        if not ids:
            raise bad_request("a request on a context needs a non-empty prompt", param=param, code="invalid_value")
        self.check_ids(ids, param)
        return ids
