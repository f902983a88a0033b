"""A vision-language model as a judge: a reward asked through an OpenAI-compatible chat
endpoint (vLLM or SGLang serving a VLM), configured as ``rewards.vlm.NAME``.

For each image the judge is asked a yes/no question about the image and its prompt
(``question``, with ``{prompt}`` filled in) and answers one token; the score is the
probability of "yes" among the yes / no answers in that token's ``top_logprobs``:
``P(yes) / (P(yes) + P(no))``, in [0, 1], NaN when neither answer is among them (the judge
said something else). Reading the probability instead of the sampled word gives a graded score
from one forward pass, the way VQAScore-style judges do. Requests go ``batch_size`` at a time
in parallel (a chat request holds one conversation); failures are retried and then named with
the URL, as every remote reward's (craft/rewards/remote.py).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from craft.rewards.base import Reward
from craft.rewards.remote import RemoteRewardError, http_json
from craft.rewards.wire import png_b64

DEFAULT_QUESTION = "Does this image show {prompt}? Answer yes or no."
YES, NO = ("yes",), ("no",)


def _answer_probability(top: list[dict], words: tuple[str, ...]) -> float:
    """Total probability of the tokens that spell one of ``words`` (case and spaces ignored)."""
    return sum(math.exp(float(t["logprob"])) for t in top
               if str(t.get("token", "")).strip().lower() in words)


class VLMJudgeReward(Reward):
    def __init__(self, name: str, url: str, *, model: str | None = None,
                 question: str = DEFAULT_QUESTION, token: str | None = None,
                 batch_size: int = 8, timeout_s: float = 120.0, retries: int = 2,
                 top_logprobs: int = 20) -> None:
        self.name = name
        super().__init__(batch_size=batch_size)
        from craft.stages.expansion import chat_completions_url

        self.url = chat_completions_url(url)
        self.model, self.question, self.token = model, question, token
        self.timeout_s, self.retries, self.top_logprobs = timeout_s, retries, top_logprobs

    def __repr__(self) -> str:
        return f"VLMJudgeReward(name={self.name!r}, url={self.url!r}, model={self.model!r})"

    def request_body(self, image, prompt: str) -> dict:
        body = {"messages": [{"role": "user", "content": [
                    {"type": "image_url",
                     "image_url": {"url": f"data:image/png;base64,{png_b64(image)}"}},
                    {"type": "text", "text": self.question.format(prompt=prompt)}]}],
                "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                "top_logprobs": self.top_logprobs}
        if self.model:
            body["model"] = self.model
        return body

    def _ask(self, image, prompt: str) -> float:
        reply = http_json(self.url, self.request_body(image, prompt), token=self.token,
                          timeout_s=self.timeout_s, retries=self.retries, what="VLM endpoint",
                          fix=f"; check rewards.vlm.{self.name}.url (an OpenAI-compatible /v1 "
                              "endpoint serving a vision-language model: vLLM, SGLang)")
        try:
            top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise RemoteRewardError(
                f"the VLM endpoint {self.url} answered without token log-probabilities "
                "(choices[0].logprobs.content[0].top_logprobs); the judge needs a server that "
                "returns them (vLLM and SGLang do with logprobs=true)") from None
        yes, no = _answer_probability(top, YES), _answer_probability(top, NO)
        return yes / (yes + no) if yes + no > 0 else float("nan")

    def _score_batch(self, images, prompts):
        with ThreadPoolExecutor(max(1, min(self.batch_size, len(images)))) as pool:
            return np.array(list(pool.map(self._ask, images, prompts)), dtype=np.float64)


__all__ = ["DEFAULT_QUESTION", "VLMJudgeReward"]
