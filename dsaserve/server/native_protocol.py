"""pydantic models of SGLang's native routes (/generate, /abort_request); the OpenAI ones are in protocol.py."""
from __future__ import annotations

from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, ValidatorFunctionWrapHandler,
                      field_validator, model_validator)

from dsaserve.server.protocol import Bootstrap, TokenIds, ClientBody


class NativeSamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default
    # (booleans strict, as protocol.ClientBody says)
    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    # SGLang's name for the seed: sglang-router forwards it and drops `seed` (a seeded /generate through the router
    # was sampled unseeded)
    sampling_seed: int | None = None
    stop: str | list[str] | None = None
    no_stop_trim: StrictBool = False
    stop_token_ids: TokenIds | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True  # (fast tokenizers, all this server loads, ignore it)
    n: int = Field(1, ge=1, le=128)  # completions per prompt: the answer lists them prompt by prompt
    regex: str | None = None
    json_schema: str | None = None  # a JSON schema, as a JSON string
    ebnf: str | None = None

    @model_validator(mode="after")
    def _one_seed(self) -> NativeSamplingParams:
        if self.sampling_seed is not None:
            if self.seed is not None and self.seed != self.sampling_seed:
                raise ValueError(f"seed ({self.seed}) and sampling_seed ({self.sampling_seed}) name the same seed: "
                                 "give one of them")
            self.seed = self.sampling_seed
        return self


_ONE, _PER_PROMPT = TypeAdapter(NativeSamplingParams), TypeAdapter(list[NativeSamplingParams])


class GenerateRequest(Bootstrap):
    text: str | list[str] | None = None  # a list: SGLang's batch (so input_ids too)
    input_ids: TokenIds | list[TokenIds] | None = None
    # a list: one per prompt of a batch, as SGLang's
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] = Field(default_factory=NativeSamplingParams)
    stream: StrictBool = False
    rid: str | list[str] | None = None  # a list: one per prompt of a batch
    routed_dp_rank: int | None = None
    return_logprob: StrictBool = False
    top_logprobs_num: int = Field(0, ge=0, le=20)
    # >= 0 with return_logprob: also the prompt's token log-probabilities from there (its length: none of them,
    # past it: a 400); -1 (SGLang's default): none
    logprob_start_len: int = Field(-1, ge=-1)
    return_text_in_logprobs: StrictBool = False  # each (logprob, token id, text) entry carries its token's text

    @field_validator("sampling_params", mode="wrap")
    @classmethod
    def _one_or_per_prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """An error names the field as sent (sampling_params.x, sampling_params.1.x), not a member of the union."""
        return _PER_PROMPT.validate_python(value) if isinstance(value, list) else _ONE.validate_python(value)


class AbortRequest(ClientBody):
    rid: str | None = None
    abort_all: StrictBool = False  # SGLang's: every request the server runs

    @model_validator(mode="after")
    def _one_of(self) -> AbortRequest:
        if (self.rid is None) == (not self.abort_all):
            raise ValueError("give either rid or abort_all: true")
        return self
