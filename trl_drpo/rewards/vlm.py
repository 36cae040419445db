"""A vision-language model as a judge: the probability that it answers "yes" to "does this image match the prompt?".

Any `transformers` image-text-to-text model works (Qwen2.5-VL, Qwen3-VL, Llava, SmolVLM, Gemma 3, ...): it is loaded
with ``AutoModelForImageTextToText`` and ``AutoProcessor``, the question is formatted with the processor's own chat
template, and one forward pass gives the next-token logits. The score is ``P(yes) / (P(yes) + P(no))`` over the
answer tokens, a probability in [0, 1]. This is the kind of black-box reward no reward-gradient method can use.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

from .base import ImageBatch, PretrainedReward, to_pil_images


DEFAULT_QUESTION = "Does this image match the prompt '{prompt}'? Answer yes or no."


def _bf16_or_fp16() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


class VLMJudge(PretrainedReward):
    """Probability that a VLM answers "yes" when asked whether the image matches its prompt.

    Args:
        model_name_or_path: any image-text-to-text checkpoint (Hub id or local directory) with a chat template.
        question: the question, with ``{prompt}`` standing for the image's prompt.
        system_prompt: optional system message.
        yes_words, no_words: answer words. Each is tokenised with and without a leading space; every variant that
            is a single token counts towards its answer (e.g. ``yes``, ``Yes``, ``▁Yes``). If no variant is a single
            token, the first token of each variant is used, minus any token both answers share.
        **kwargs: device, dtype (bfloat16 on GPU by default), batch size, ``model_kwargs`` (e.g.
            ``{"device_map": "auto"}`` for models larger than one GPU, or ``attn_implementation``) and Hub options of
            `PretrainedReward`.
    """

    name = "vlm_judge"
    input_format = "pil"  # VLM processors differ too much (dynamic resolution, tiling) to bypass them
    default_model_name_or_path = "Qwen/Qwen2.5-VL-3B-Instruct"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        question: str = DEFAULT_QUESTION,
        system_prompt: str | None = None,
        yes_words: Sequence[str] = ("yes", "Yes", "YES"),
        no_words: Sequence[str] = ("no", "No", "NO"),
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        # Language models overflow in float16 more often than vision towers: prefer bfloat16 on GPU.
        self.gpu_dtype = _bf16_or_fp16()
        super().__init__(model_name_or_path, batch_size=batch_size, **kwargs)
        if "{prompt}" not in question:
            raise ValueError("The question must contain '{prompt}', where the image's prompt goes.")
        self.question = question
        self.system_prompt = system_prompt
        self.yes_words = tuple(yes_words)
        self.no_words = tuple(no_words)

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.model_name_or_path, **self.hub_kwargs)
        tokenizer = self.processor.tokenizer
        # Left padding puts every sequence's last token in the last column, where the next-token logits are read.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = self._place(
            AutoModelForImageTextToText.from_pretrained(self.model_name_or_path, **self._from_pretrained_kwargs())
        )
        self.yes_ids, self.no_ids = self._answer_token_ids(tokenizer)
        # Only the last position's logits are needed; asking for just those saves a (B, L, vocab) tensor.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _answer_token_ids(self, tokenizer: Any) -> tuple[list[int], list[int]]:
        def variants(words: Sequence[str]) -> list[list[int]]:
            return [tokenizer.encode(text, add_special_tokens=False) for word in words for text in (word, " " + word)]

        yes, no = variants(self.yes_words), variants(self.no_words)
        yes_ids = {ids[0] for ids in yes if len(ids) == 1}
        no_ids = {ids[0] for ids in no if len(ids) == 1}
        if not yes_ids or not no_ids:  # e.g. byte-level toy tokenizers: fall back to first tokens
            yes_ids = {ids[0] for ids in yes if ids}
            no_ids = {ids[0] for ids in no if ids}
        shared = yes_ids & no_ids
        yes_ids, no_ids = yes_ids - shared, no_ids - shared
        if not yes_ids or not no_ids:
            raise ValueError(
                f"Cannot tell the answers apart with this tokenizer: yes words {self.yes_words} and no words "
                f"{self.no_words} map to the same tokens. Pass other `yes_words` / `no_words`."
            )
        return sorted(yes_ids), sorted(no_ids)

    def _messages(self, prompt: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content = [{"type": "image"}, {"type": "text", "text": self.question.format(prompt=prompt)}]
        messages.append({"role": "user", "content": content})
        return messages

    def _score(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        texts = [
            self.processor.apply_chat_template(self._messages(p), add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        inputs = self.processor(images=to_pil_images(images), text=texts, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {
            k: (v.to(device, self.dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()
        }
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        logits = self.model(**inputs, **extra).logits[:, -1].float()
        log_yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        log_no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(log_yes - log_no)  # = P(yes) / (P(yes) + P(no))
