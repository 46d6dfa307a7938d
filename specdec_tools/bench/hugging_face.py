"""Systems (d) and (e): transformers' PyTorch ``generate`` on CPU, assisted by the draft and alone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .cells import Run

AUTO_START = 5  # the orchestrator's default k, where auto starts (transformers' heuristic too)


def load_hf_model(path: Path) -> Any:
    """transformers' T5ForConditionalGeneration in float32 from an HF directory, or from an MLX
    directory written by ``specdec-convert``/``specdec-train-demo`` (our parameter names)."""
    import torch
    from safetensors.torch import load_file
    from transformers import T5Config, T5ForConditionalGeneration

    from specdec_core.t5 import _rename, is_hf_layout

    config = json.loads((path / "config.json").read_text())
    weights_file = path / "model.safetensors"
    names: list[str] = []
    if weights_file.is_file():
        from safetensors import safe_open

        with safe_open(str(weights_file), "np") as handle:
            names = list(handle.keys())
    if not names or is_hf_layout(names):
        return T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if (config.get("specdec") or {}).get("quantization"):
        raise RuntimeError(f"{path} is quantized; the transformers baselines need float weights")
    weights = load_file(str(weights_file))
    scale = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True) is not False)
    # transformers derives its output scaling from tie_word_embeddings (then ties the head).
    settings = {k: v for k, v in config.items() if k not in ("specdec", "scale_decoder_outputs")}
    model = T5ForConditionalGeneration(T5Config.from_dict({**settings, "tie_word_embeddings": scale}))
    if "lm_head.weight" in weights:  # v1.1: its own head, not a view of the embedding
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    state = {}
    for name in model.state_dict():
        tied = name.endswith("embed_tokens.weight") or (name == "lm_head.weight" and name not in weights)
        ours = "shared.weight" if tied else _rename(name)
        if ours not in weights:
            raise RuntimeError(f"{path}: no tensor for {name} (ours: {ours})")
        state[name] = weights[ours].float()
    model.load_state_dict(state, strict=True)
    return model.eval()


class HuggingFace:
    """transformers' generate on PyTorch CPU, target alone and assisted by the draft."""

    def __init__(self, draft: Path, target: Path):
        from specdec_core.tokenizer import load_tokenizer

        self.target = load_hf_model(target)
        self.draft = load_hf_model(draft)
        self.tokenizer = load_tokenizer(target)
        self.eos = self.target.config.eos_token_id
        self.passes = {"target": 0, "draft": 0}
        self.target.get_decoder().register_forward_hook(lambda *_: self._count("target"))
        self.draft.get_decoder().register_forward_hook(lambda *_: self._count("draft"))

    def _count(self, which: str) -> None:
        self.passes[which] += 1

    def generate(self, prompt: str, index: int, max_tokens: int, k: str | None, temperature: float,
                 seed: int) -> Run:
        import torch

        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        options: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=temperature > 0)
        if temperature > 0:
            options.update(temperature=temperature, top_k=0, top_p=1.0)
        if k is not None:
            config = self.draft.generation_config
            if k == "auto":
                config.num_assistant_tokens = AUTO_START
                config.num_assistant_tokens_schedule = "heuristic"
                config.assistant_confidence_threshold = type(config)().assistant_confidence_threshold
            else:
                config.num_assistant_tokens = int(k)
                config.num_assistant_tokens_schedule = "constant"
                config.assistant_confidence_threshold = 0.0
            options["assistant_model"] = self.draft
        import transformers
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        # transformers 5.24 sizes generate()'s own decoder cache by the encoder's depth; a
        # target with more decoder than encoder layers (the demo target) then fails. A cache
        # that grows per layer avoids it.
        cache_arg = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
        options[cache_arg] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        torch.manual_seed(seed)
        self.passes = {"target": 0, "draft": 0}
        cpu = time.process_time()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.target.generate(input_ids, **options)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        generated = out[0].tolist()[1:]  # after the decoder start token
        visible = generated[: generated.index(self.eos)] if self.eos in generated else generated
        return Run(index, wall, len(generated), visible, steps=self.passes["target"],
                   target_passes=self.passes["target"], draft_passes=self.passes["draft"], cpu_s=cpu)

    def close(self) -> None:
        pass
