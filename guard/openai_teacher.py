"""A teacher behind an OpenAI-compatible HTTP endpoint: a vendor API, vLLM, or our own server.

The official `openai` client does the HTTP: timeouts, and retries with exponential backoff on 408,
409, 429 and 5xx that honour the server's ``Retry-After``. This module maps prompts and sampling
onto chat completions or completions, and turns failures into errors that say what to do, typed by whose
fault they are, so that a gateway in front of the endpoint answers its own client rightly (`status`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import openai

from guard.prompts import Conversation
from guard.teacher import LAB_TIME_HEADER, Caller, Completion, Sampling, Teacher, TokenLogprob, callers_for


class TeacherHTTPError(RuntimeError):
    """The endpoint failed after every retry, or answered something that is not a completion.

    `status` is what a proxy in front of the endpoint answers its own client: 502, the upstream failed."""

    status = 502


class TeacherTimeout(TeacherHTTPError):
    """The endpoint did not answer within the timeout (after every retry)."""

    status = 504


class TeacherAuthError(TeacherHTTPError, PermissionError):
    """The endpoint rejected the API key (HTTP 401/403): the caller's own credentials, not its request."""


class TeacherRequestError(TeacherHTTPError):
    """The endpoint refused the request itself (a 4xx other than 401/403: a prompt over its context, an unknown
    model), with its own `message`, `kind` and `code`: the request is the caller's to fix, and retrying cannot
    help."""

    def __init__(self, text: str, status: int, message: str, kind: str, code: str | None,
                 retry_after: str | None = None):
        super().__init__(text)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.retry_after = retry_after  # an upstream 429's, passed on so that the client's SDK waits as long


class OpenAITeacher(Teacher):
    """Completes prompts through an OpenAI-compatible endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key: bearer token; ``None`` reads ``OPENAI_API_KEY``.
        api: ``"chat"`` (each prompt is one user message) or ``"completions"`` (raw prompts). A `Conversation`
            goes to chat completions whole, whichever `api`.
        timeout: seconds per HTTP request.
        max_retries: retries on 408/409/429/5xx, timeouts and connection errors (a proxy keeps them few: its
            client retries too).
        concurrency: requests in flight at once.
        lab_clock: send each caller's simulated time in the ``LAB_TIME_HEADER`` (to a gateway started with
            ``--lab``), one request at a time in the callers' order: the order a traffic monitor judges.

    Example:
        >>> teacher = OpenAITeacher("http://127.0.0.1:8000/v1", model="teacher-a", api_key="sk-local")
        >>> teacher.complete(["question: where does Kalon live?\\n"], Sampling(temperature=0))[0].answer
    """

    concurrent = True  # each prompt is its own HTTP request: callers need not wait for one another

    def __init__(self, base_url: str, model: str, api_key: str | None = None, api: str = "chat",
                 timeout: float = 60.0, max_retries: int = 5, concurrency: int = 8, lab_clock: bool = False):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout,
                                    max_retries=max_retries)
        self.base_url, self.model, self.api, self.concurrency, self.timeout = base_url, model, api, concurrency, timeout
        self.lab_clock = lab_clock
        self.name = model

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(),
                 callers: Sequence[Caller] | None = None) -> list[Completion]:
        """Every prompt goes out under this client's one API key: the endpoint, not `callers`, decides the
        account (a harvester playing several accounts holds one OpenAITeacher per key); with `lab_clock`, their
        times go along."""
        callers = callers_for(prompts, callers)
        if self.lab_clock:  # one at a time, in order: the simulated clock's order is the order the monitor sees
            return [self._complete_one(p, sampling, c) for p, c in zip(prompts, callers)]
        if len(prompts) == 1:  # the gateway's case: no thread pool to start and stop for one request
            return [self._complete_one(prompts[0], sampling)]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._complete_one(p, sampling), prompts))

    def _complete_one(self, prompt: str, sampling: Sampling, caller: Caller | None = None) -> Completion:
        omit = openai.omit  # a field left out of the request, rather than sent as null
        lab_time = caller is not None and caller.time is not None
        common = dict(model=self.model, temperature=sampling.temperature, top_p=sampling.top_p,
                      max_tokens=sampling.max_new_tokens, seed=omit if sampling.seed is None else sampling.seed,
                      extra_body={"top_k": sampling.top_k} if sampling.top_k else None,
                      extra_headers={LAB_TIME_HEADER: repr(caller.time)} if lab_time else None)
        try:
            conversation = prompt.messages if isinstance(prompt, Conversation) else None
            if conversation is not None or self.api == "chat":
                response = self.client.chat.completions.create(
                    messages=conversation or [{"role": "user", "content": prompt}],
                    logprobs=sampling.logprobs > 0 or omit, top_logprobs=sampling.logprobs or omit, **common)
                return self._from_chat(response)
            response = self.client.completions.create(prompt=prompt, logprobs=sampling.logprobs or omit, **common)
            return self._from_completions(response)
        except openai.AuthenticationError:
            raise TeacherAuthError(f"{self.base_url} rejected the API key (HTTP 401): pass the right key "
                                   "with --api-key or OPENAI_API_KEY") from None
        except openai.PermissionDeniedError as exc:
            if _code(exc) == "refused":  # a defence refused this one request (the gateway's monitor): no answer
                return Completion(text="", finish_reason="refused")
            raise TeacherAuthError(f"{self.base_url} refused access to model {self.model!r} (HTTP 403)") from None
        except openai.APIStatusError as exc:
            if 400 <= exc.status_code < 500:
                body = exc.body if isinstance(exc.body, dict) else {}
                message = str(body.get("message") or exc.message)
                raise TeacherRequestError(f"{self.base_url} refused the request (HTTP {exc.status_code}): {message}",
                                          exc.status_code, message, str(body.get("type") or "invalid_request_error"),
                                          body.get("code"), exc.response.headers.get("retry-after")) from None
            raise TeacherHTTPError(f"{self.base_url} answered HTTP {exc.status_code} after retries: "
                                   f"{exc.message}") from None
        except openai.APITimeoutError:
            raise TeacherTimeout(f"cannot reach {self.base_url}: no answer within {self.timeout} s") from None
        except openai.APIConnectionError as exc:
            raise TeacherHTTPError(f"cannot reach {self.base_url}: {exc}") from None
        except (openai.APIError, AttributeError, TypeError, ValueError) as exc:  # a body that is no completion
            raise TeacherHTTPError(f"{self.base_url} answered something that is not a completion: "
                                   f"{exc!r:.200}") from None

    @staticmethod
    def _from_chat(response) -> Completion:
        choice = _first_choice(response)
        per_token = sampled = None
        if choice.logprobs is not None and choice.logprobs.content:
            steps = choice.logprobs.content
            per_token = [[TokenLogprob(t.token, t.logprob) for t in step.top_logprobs] for step in steps]
            sampled = [TokenLogprob(step.token, step.logprob) for step in steps]
        return Completion(text=choice.message.content or "", logprobs=per_token, token_logprobs=sampled,
                          finish_reason=choice.finish_reason or "stop", **_billed(response),
                          sealed_reasoning=(choice.message.model_extra or {}).get("sealed_reasoning"))

    @staticmethod
    def _from_completions(response) -> Completion:
        choice = _first_choice(response)
        per_token = sampled = None
        if choice.logprobs is not None and choice.logprobs.top_logprobs:
            lp = choice.logprobs
            per_token = [[TokenLogprob(token, logprob) for token, logprob in step.items()] for step in lp.top_logprobs]
            sampled = [TokenLogprob(token, logprob) for token, logprob in zip(lp.tokens, lp.token_logprobs)]
        return Completion(text=choice.text or "", logprobs=per_token, token_logprobs=sampled,
                          finish_reason=choice.finish_reason or "stop", **_billed(response),
                          sealed_reasoning=(choice.model_extra or {}).get("sealed_reasoning"))


def _billed(response) -> dict[str, int | None]:
    """The tokens the endpoint reports for this one-prompt request (hidden reasoning included): its count is
    the one to bill by, since its tokenizer is not known here."""
    if response.usage is None:
        return {"completion_tokens": None, "prompt_tokens": None}
    return {"completion_tokens": response.usage.completion_tokens, "prompt_tokens": response.usage.prompt_tokens}


def _code(exc: openai.APIStatusError) -> str | None:
    """The `code` of an error in OpenAI's shape (the SDK hands over its "error" object as the body)."""
    return exc.body.get("code") if isinstance(exc.body, dict) else None


def _first_choice(response):
    if not getattr(response, "choices", None):
        raise TeacherHTTPError(f"the endpoint answered with no choices: {response!r:.200}")
    return response.choices[0]
