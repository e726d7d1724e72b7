"""The one prompt builder: what an adapter trains on is byte-for-byte what it is served and evaluated on.

A sourced prompt puts the retrieved chunks, numbered, before the question and asks the model to
cite them as [n]. Training (`lorag.examples.with_retrieved_sources`), the endpoint (`lorag.gateway`)
and evaluation all build prompts here; the chat template is applied later, by the tokenizer of
the model that runs them (`lorag.engine`).
"""

from __future__ import annotations

from typing import Any

INSTRUCTION = (
    "Answer the question using the numbered sources below. Cite the sources you use with their "
    "number in brackets, like [1]. If the sources do not contain the answer, say so."
)


def question(messages: list[dict[str, str]]) -> str:
    """The text retrieval searches for: the last user message ("" if there is none)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def with_system(messages: list[dict[str, str]], system_prompt: str | None, client_system: str = "follow") -> list[dict[str, str]]:
    """The conversation led by the adapter's system prompt.

    When the conversation opens with its own system message, `client_system` decides
    (`serve.client_system_message`): "follow" keeps the adapter's prompt first, the conversation's
    after it in the same system message (one system message: some chat templates accept no
    other); "replace" lets the conversation's stand alone.
    """
    if not system_prompt or not messages:
        return messages
    if messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    if client_system == "replace" or messages[0]["content"] == system_prompt:
        return messages
    return [{"role": "system", "content": f"{system_prompt}\n\n{messages[0]['content']}"}, *messages[1:]]


def augment(messages: list[dict[str, str]], hits: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Return `messages` with the last user message wrapped in the numbered sources.

    With no hits the messages are returned unchanged.
    """
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not hits or not users:
        return messages
    last = users[-1]
    content = augment_text(messages[last]["content"], hits, "Question: ")
    return [*messages[:last], {"role": "user", "content": content}, *messages[last + 1 :]]


def augment_text(prompt: str, hits: list[dict[str, Any]], lead: str = "") -> str:
    """`prompt` preceded by the instruction and the numbered sources (unchanged with no hits)."""
    if not hits:
        return prompt
    context = "\n\n".join(f"[{n}] {h['title']}\n{h['text']}" for n, h in enumerate(hits, 1))
    return f"{INSTRUCTION}\n\nSources:\n{context}\n\n{lead}{prompt}"


def chat_prompt(messages: list[dict[str, str]], hits: list[dict[str, Any]], system_prompt: str | None,
                client_system: str = "follow") -> list[dict[str, str]]:
    """The messages a model is given for a chat turn: the adapter's system prompt (with or in place
    of the client's, see `with_system`), then the conversation with its last question wrapped in
    the sources (when there are any)."""
    return with_system(augment(messages, hits), system_prompt, client_system)
