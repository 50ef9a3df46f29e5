"""Data: reading a dataset from a file, a folder or the Hub (:mod:`.sources`), a site's examples and their
encoding (:mod:`.examples`), partitioning a dataset across clients (:mod:`.partition`), and the offline assets
(:mod:`.assets`)."""

from fedlora_cli.data.examples import (
    IGNORE_INDEX, CausalExamples, Examples, PromptResponses, batch_schedule, encode, encode_causal, encode_prompts, fit,
    prompt_ids, read_examples, read_prompt_responses, read_shard, response_ids, steps_for,
)

__all__ = [
    "CausalExamples", "Examples", "IGNORE_INDEX", "PromptResponses", "batch_schedule", "encode", "encode_causal",
    "encode_prompts", "fit", "prompt_ids", "read_examples", "read_prompt_responses", "read_shard", "response_ids", "steps_for"
]
