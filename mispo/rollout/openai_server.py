"""A local OpenAI-compatible chat-completions endpoint in front of the rollout engines, one path per episode.

    server = ChatServer(tokenizer, max_context=recipe.rollout.max_model_len)   # loopback, a free port
    episode_id = server.open(episode)        # episode.complete(prompt_ids, max_tokens) -> Completion
    url = server.base_url(episode_id)        # http://127.0.0.1:PORT/episodes/<id>/v1, for openai.OpenAI
    server.close(episode_id); server.stop()

Routes (FastAPI in a uvicorn thread): `POST /episodes/<id>/v1/chat/completions` and
`GET /episodes/<id>/v1/models`. A request is validated with vLLM's `ChatCompletionRequest` and answered
with vLLM's `ChatCompletionResponse` (its `prompt_token_ids` and the choice's `token_ids` included).

Prompts: the tokenizer's chat template (messages, `tools`, generation prompt), tokenised without special
tokens as `episodes.chat_encoder` does. When a request continues the episode's last call (its messages,
then the reply it got, unchanged, then new messages), the prompt is that call's prompt + its sampled ids
+ the template text of the rest (the turn's closing, less what the sampled stop token already is), so
the model's own tokens are never re-tokenised from its text (`prompt_ids`). These ids are exactly what
the engine gets; the episode decides budgets, generates, and records the call.

Sampling is the run's: `temperature`, `top_p`, `seed`, `stop`... of a request are ignored (RL trains
on pi_rollout at the run's settings); `max_completion_tokens` / `max_tokens` can only lower the turn's
budget. Errors are OpenAI-style error bodies, never exceptions in the run: unknown model or episode 404;
malformed body, `n` > 1, `stream`, non-text content, a template error or a prompt of max_context tokens
or more 400 (`context_length_exceeded`); an `ApiError` raised by the episode is answered as it says.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request  # resolved by FastAPI from this module's names (annotations are strings here)

SERVED_MODEL = "policy"


@dataclass
class Completion:
    """One model turn: the sampled ids (stop token included), their text, "stop" / "length", the
    sampled ids' log-probs, and the weight version that sampled them."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
    version: int = 0


@dataclass
class Call:
    """One chat-completions call as the engine saw and answered it (and the messages it came from)."""

    prompt_ids: list[int]
    completion: Completion
    messages: list[dict] = field(default_factory=list)


class ApiError(Exception):
    """An error the endpoint answers as `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or self.status}}


class EpisodeEndpoint(Protocol):
    calls: list[Call]  # its calls so far, the last one continued by `ChatServer.prompt_ids`

    def complete(self, prompt_ids: list[int], max_tokens: int | None, messages: list[dict]) -> Completion: ...


class ChatServer:
    """See the module docstring. `model_name` is the one model served; `max_context` the engine's context."""

    def __init__(self, tokenizer, max_context: int, model_name: str = SERVED_MODEL, host: str = "127.0.0.1"):
        import uvicorn

        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("rollout.environment_kind = 'openai_agent': the policy's tokenizer has no chat template, "
                             "so chat messages cannot become prompts; fix: use a model whose tokenizer_config.json "
                             "has a chat_template (or add one to it)")
        self.tokenizer, self.max_context, self.model_name = tokenizer, int(max_context), model_name
        self.episodes: dict[str, EpisodeEndpoint] = {}
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))  # the OS picks a free port; uvicorn serves on this very socket
        self.host, self.port = host, sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self._app(), log_level="warning", lifespan="off",
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="mispo-openai-server")
        self._thread.start()
        while not self._server.started:  # up in well under a second; a failed start ends the thread
            if not self._thread.is_alive():
                raise RuntimeError(f"the OpenAI-compatible rollout server did not start on {host}:{self.port}")
            time.sleep(0.01)

    # ------------------------------------------------------------------ episodes
    def open(self, episode: EpisodeEndpoint) -> str:
        """Register an episode; returns its id (its base_url is `base_url(id)`)."""
        episode_id = uuid.uuid4().hex
        with self._lock:
            self.episodes[episode_id] = episode
        return episode_id

    def close(self, episode_id: str) -> None:
        with self._lock:
            self.episodes.pop(episode_id, None)

    def base_url(self, episode_id: str) -> str:
        return f"http://{self.host}:{self.port}/episodes/{episode_id}/v1"

    def stop(self) -> None:
        """Stop serving (requests in flight get up to 5 s to be answered)."""
        self._server.should_exit = True
        self._thread.join()

    # ------------------------------------------------------------------ requests
    def render(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool = True) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                                      tokenize=False)
        except Exception as exc:  # jinja's TemplateError (e.g. roles must alternate), a missing key
            raise ApiError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None, last: Call | None = None) -> list[int]:
        """The prompt of `messages`: the template (generation prompt added) tokenised, or, when they continue
        `last` (its messages, then its reply unchanged, then more), last's prompt + sampled ids + the new
        messages' template text: the model's own tokens are never re-tokenised from its text."""
        full = self.render(messages, tools)
        k = len(last.messages) if last is not None else 0
        if k < 1 or len(messages) <= k + 1 or messages[:k] != last.messages or \
                messages[k] != {"role": "assistant", "content": last.completion.text}:
            return self.encode(full)
        try:
            head, base = self.render(messages[:k], tools), self.render(messages[:k + 1], tools, generation_prompt=False)
        except ApiError:  # a template that renders only whole conversations
            return self.encode(full)
        turn = base[len(head):] if base.startswith(head) else ""
        if not (turn.startswith(last.completion.text) and full.startswith(base)):
            return self.encode(full)  # the template changes the reply or the history: render it all
        closing = turn[len(last.completion.text):]  # the template's end of the turn, e.g. "<|eot|>"
        ids = last.completion.token_ids
        if last.completion.finish_reason == "stop" and ids:  # the sampled stop token stands for it
            stop = self.tokenizer.decode(ids[-1:])
            closing = closing[len(stop):] if closing.startswith(stop) else closing
        return last.prompt_ids + ids + self.encode(closing + full[len(base):])

    def chat(self, episode_id: str, body: Any) -> dict:
        """One chat-completions call (the body as parsed JSON) -> the response body; raises ApiError."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionLogProbs, ChatCompletionLogProbsContent, ChatCompletionRequest, ChatCompletionResponse,
            ChatCompletionResponseChoice, ChatMessage, UsageInfo)

        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, f"malformed chat-completions request: {exc}") from None
        if request.model not in (None, self.model_name):  # None: the served model, as in vLLM
            raise ApiError(404, f"The model `{request.model}` does not exist; this endpoint serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")
        if (request.n or 1) != 1:
            raise ApiError(400, f"n = {request.n}: one choice per call (a rollout episode is one trajectory)",
                           param="n")
        if request.stream:
            raise ApiError(400, "stream = true is not supported by the rollout endpoint", param="stream")
        episode = self._episode(episode_id)
        messages = [_text_message(i, m) for i, m in enumerate(request.messages)]
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        prompt = self.prompt_ids(messages, tools, episode.calls[-1] if episode.calls else None)
        if len(prompt) >= self.max_context:
            raise ApiError(400, f"This model's maximum context length is {self.max_context} tokens. However, "
                                f"your messages resulted in {len(prompt)} tokens. Please reduce the length of "
                                "the messages.", param="messages", code="context_length_exceeded")
        with warnings.catch_warnings():  # vLLM marks max_tokens deprecated (in favour of max_completion_tokens)
            warnings.simplefilter("ignore", DeprecationWarning)
            limit = request.max_completion_tokens or request.max_tokens
        out = episode.complete(prompt, limit, messages)
        logprobs = None
        if request.logprobs:
            tokens = [self.tokenizer.decode([t]) for t in out.token_ids]
            logprobs = ChatCompletionLogProbs(content=[
                ChatCompletionLogProbsContent(token=tok, logprob=lp, bytes=list(tok.encode()))
                for tok, lp in zip(tokens, out.logprobs)])
        choice = ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content=out.text),
                                              logprobs=logprobs, finish_reason=out.finish_reason,
                                              token_ids=list(out.token_ids))
        usage = UsageInfo(prompt_tokens=len(prompt), completion_tokens=len(out.token_ids),
                          total_tokens=len(prompt) + len(out.token_ids))
        return ChatCompletionResponse(model=self.model_name, choices=[choice], usage=usage,
                                      prompt_token_ids=prompt).model_dump(exclude_none=True)

    def _episode(self, episode_id: str) -> EpisodeEndpoint:
        with self._lock:
            episode = self.episodes.get(episode_id)
        if episode is None:
            raise ApiError(404, f"no running episode {episode_id!r} on this endpoint (it ended, or the "
                                "base_url is not one the run gave)", code="episode_not_found")
        return episode

    def _app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI(title="mispo rollout endpoint")

        @app.post("/episodes/{episode_id}/v1/chat/completions")
        async def chat_completions(episode_id: str, request: Request):
            try:
                body = await request.json()
            except ValueError as exc:
                return JSONResponse(ApiError(400, f"the body is not JSON: {exc}").body(), status_code=400)
            try:  # the episode blocks until its turn is generated with the others': off the event loop
                return JSONResponse(await _in_thread(self.chat, episode_id, body))
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            except Exception as exc:  # noqa: BLE001 - the engine's failure reaches the run through the batcher
                return JSONResponse(ApiError(500, f"generation failed: {exc}", type="server_error").body(),
                                    status_code=500)

        @app.get("/episodes/{episode_id}/v1/models")
        async def models(episode_id: str):
            from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

            try:
                self._episode(episode_id)
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            card = ModelCard(id=self.model_name, owned_by="mispo", max_model_len=self.max_context)
            return JSONResponse(ModelList(data=[card]).model_dump())

        return app


def _text_message(index: int, message: dict) -> dict:
    """A message with its content as one string (text parts joined; None -> "")."""
    content = message.get("content")
    if isinstance(content, list):
        if any(part.get("type") != "text" for part in content):
            raise ApiError(400, f"messages[{index}]: only text content parts are supported",
                           param=f"messages[{index}].content")
        content = "".join(part["text"] for part in content)
    return {k: v for k, v in message.items() if v is not None} | {"content": content or ""}


async def _in_thread(fn, *args):
    """fn(*args) in a thread of its own: every episode's call may wait at once (a pool's cap would deadlock
    the turn batcher, which waits for all running episodes)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def target():
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return await asyncio.wrap_future(future)
