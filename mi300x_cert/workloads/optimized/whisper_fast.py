"""Optimized Whisper greedy decoding: static KV cache + one fixed-shape decode step captured as a
device graph per batch size, written with plain torch over the Hugging Face model's own weights.

Per batch: the encoder runs once; the cross-attention K/V of every decoder layer are projected once
from its output; then ``prompt_len + new_tokens - 1`` replays of the decode step graph. The step
reads its position from a device counter (so the same graph serves every position), writes the
new self-attention K/V into the static cache at that position, attends over the cache with a mask
for the not-yet-written positions, applies the generation rules stock ``generate`` applies
(suppressed tokens, begin-suppressed tokens at the first generated position, EOS suppressed until
``min_new_tokens``), takes the arg-max and advances the counter — all on the device, so the host
only replays. Greedy, like the stock path; same tokens on the same inputs (checked on the CPU
against ``WhisperForConditionalGeneration.generate``; on a GPU a few arg-max ties may resolve
differently in fp16 — the bench reports the agreement).
"""

from __future__ import annotations

import time
from typing import Any

from .common import graphs_supported

__all__ = ["FastWhisper", "whisper_prompt_ids"]


def whisper_prompt_ids(generation_config: Any, language: str | None = "en", task: str = "transcribe") -> list[int]:
    """[<|startoftranscript|>, <|lang|>, <|task|>, <|notimestamps|>] from a generation config."""
    ids = [int(generation_config.decoder_start_token_id)]
    lang_to_id = getattr(generation_config, "lang_to_id", None) or {}
    task_to_id = getattr(generation_config, "task_to_id", None) or {}
    if language and lang_to_id:
        key = language if language.startswith("<|") else f"<|{language}|>"
        if key in lang_to_id:
            ids.append(int(lang_to_id[key]))
    if task and task in task_to_id:
        ids.append(int(task_to_id[task]))
    nts = getattr(generation_config, "no_timestamps_token_id", None)
    if nts is not None:
        ids.append(int(nts))
    return ids


class FastWhisper:
    """Greedy decoding of ``new_tokens`` tokens per clip with a graph-captured static-cache step."""

    def __init__(
        self,
        model: Any,
        *,
        prompt_ids: list[int],
        new_tokens: int,
        min_new_tokens: int | None = None,
        suppress_tokens: list[int] | None = None,
        begin_suppress_tokens: list[int] | None = None,
        eos_token_id: int | None = None,
        device: str = "cpu",
        graphs: bool = True,
    ) -> None:
        import torch

        self.model = model
        self.device = device
        self.prompt = [int(x) for x in prompt_ids]
        self.new_tokens = int(new_tokens)
        self.min_new = int(new_tokens if min_new_tokens is None else min_new_tokens)
        self.total = len(self.prompt) + self.new_tokens  # sequence length incl. prompt
        dec = model.model.decoder
        self.dec = dec
        self.layers = list(dec.layers)
        cfg = model.config
        self.E = int(cfg.d_model)
        self.H = int(cfg.decoder_attention_heads)
        self.D = self.E // self.H
        self.V = int(cfg.vocab_size)
        self.embed_scale = float(getattr(dec, "embed_scale", 1.0) or 1.0)
        self.dtype = next(model.parameters()).dtype
        w = next(model.parameters())
        self.eos = eos_token_id
        # Additive logit masks (float32, like generate's processed scores): row 0 for the first
        # generated position, row 1 for the following ones.
        base = torch.zeros(self.V, dtype=torch.float32)
        if suppress_tokens:
            base[torch.tensor(sorted(set(int(t) for t in suppress_tokens)), dtype=torch.long)] = float("-inf")
        self.suppress_eos = self.eos is not None and self.min_new > 0
        first = base.clone()
        if begin_suppress_tokens:
            first[torch.tensor(sorted(set(int(t) for t in begin_suppress_tokens)), dtype=torch.long)] = float("-inf")
        self.masks = torch.stack([first, base]).to(w.device)
        self.use_graphs = bool(graphs) and graphs_supported(device)
        self._states: dict[int, dict[str, Any]] = {}
        self.capture_s: dict[int, float] = {}
        self.reason = "eager" if not self.use_graphs else "not captured yet"

    # -- per-batch-size static state ---------------------------------------------------------------
    def _state(self, B: int, S: int) -> dict[str, Any]:
        import torch

        st = self._states.get(B)
        if st is not None and st["S"] == S:
            return st
        self._states.clear()  # one batch size's caches at a time (they are large)
        dev = next(self.model.parameters()).device
        L, H, D, T = len(self.layers), self.H, self.D, self.total
        st = {
            "S": S,
            "k": [torch.zeros(B, H, T, D, dtype=self.dtype, device=dev) for _ in range(L)],
            "v": [torch.zeros(B, H, T, D, dtype=self.dtype, device=dev) for _ in range(L)],
            "ck": [torch.zeros(B, H, S, D, dtype=self.dtype, device=dev) for _ in range(L)],
            "cv": [torch.zeros(B, H, S, D, dtype=self.dtype, device=dev) for _ in range(L)],
            "pos": torch.zeros(1, dtype=torch.long, device=dev),
            "tokens": torch.zeros(B, T, dtype=torch.long, device=dev),
            "prompt": torch.tensor(self.prompt, dtype=torch.long, device=dev),
            "ar": torch.arange(T, device=dev),
            "graph": None,
        }
        self._states[B] = st
        return st

    # -- the step (one position for the whole batch) -----------------------------------------------
    def _step(self, st: dict[str, Any]) -> None:
        import torch
        import torch.nn.functional as F

        B = st["tokens"].shape[0]
        H, D, E = self.H, self.D, self.E
        pos = st["pos"]                                   # (1,) long, on device
        P = len(self.prompt)
        tok = st["tokens"].index_select(1, pos).view(B)  # token at this position
        h = self.dec.embed_tokens(tok).view(B, 1, E)  # the decoder does not scale embeddings
        h = h + self.dec.embed_positions.weight.index_select(0, pos).view(1, 1, E).to(h.dtype)
        mask = (st["ar"] <= pos).view(1, 1, 1, -1)       # written cache positions
        for li, layer in enumerate(self.layers):
            sa = layer.self_attn
            r = h
            x = layer.self_attn_layer_norm(h)
            q = (sa.q_proj(x) * sa.scaling).view(B, 1, H, D).transpose(1, 2)
            k = sa.k_proj(x).view(B, 1, H, D).transpose(1, 2)
            v = sa.v_proj(x).view(B, 1, H, D).transpose(1, 2)
            st["k"][li].index_copy_(2, pos, k)
            st["v"][li].index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, st["k"][li], st["v"][li], attn_mask=mask, scale=1.0)
            h = r + sa.out_proj(a.transpose(1, 2).reshape(B, 1, E))
            ca = layer.encoder_attn
            r = h
            x = layer.encoder_attn_layer_norm(h)
            q = (ca.q_proj(x) * ca.scaling).view(B, 1, H, D).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, st["ck"][li], st["cv"][li], scale=1.0)
            h = r + ca.out_proj(a.transpose(1, 2).reshape(B, 1, E))
            r = h
            x = layer.final_layer_norm(h)
            h = r + layer.fc2(layer.activation_fn(layer.fc1(x)))
        h = self.dec.layer_norm(h)
        logits = self.model.proj_out(h).view(B, -1).float()
        gen_index = pos + 1 - P                           # index of the token being chosen among new ones
        row = (gen_index > 0).long()                      # 0 → first generated position
        scores = logits + self.masks.index_select(0, row)
        if self.suppress_eos:
            scores[:, self.eos] = torch.where(gen_index < self.min_new,
                                              torch.full_like(gen_index, 0, dtype=scores.dtype) - float("inf"),
                                              scores[:, self.eos])
        nxt = scores.argmax(dim=-1)
        nxt_pos = pos + 1
        # during the prompt the next token is the next prompt token, else the arg-max
        forced = st["prompt"].index_select(0, torch.clamp(nxt_pos, max=P - 1))
        choice = torch.where(nxt_pos < P, forced.expand(B), nxt)
        st["tokens"].index_copy_(1, torch.clamp(nxt_pos, max=self.total - 1), choice.view(B, 1))
        pos.add_(1)

    # -- per batch ------------------------------------------------------------------------------
    def prefill(self, input_features: Any) -> dict[str, Any]:
        """Encoder once, cross K/V once, static caches reset, prompt placed."""
        import torch

        with torch.inference_mode():
            enc = self.model.model.encoder(input_features.to(self.dtype), return_dict=True).last_hidden_state
            B, S, _ = enc.shape
            st = self._state(B, S)
            for li, layer in enumerate(self.layers):
                ca = layer.encoder_attn
                st["ck"][li].copy_(ca.k_proj(enc).view(B, S, self.H, self.D).transpose(1, 2))
                st["cv"][li].copy_(ca.v_proj(enc).view(B, S, self.H, self.D).transpose(1, 2))
            for li in range(len(self.layers)):
                st["k"][li].zero_()
                st["v"][li].zero_()
            st["tokens"].zero_()
            st["tokens"][:, : len(self.prompt)] = st["prompt"]
            st["pos"].zero_()
        return st

    def _capture(self, st: dict[str, Any]) -> None:
        import torch

        t0 = time.perf_counter()
        saved = [t.clone() for t in (st["pos"], st["tokens"])]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step(st)
        torch.cuda.current_stream().wait_stream(s)
        st["pos"].copy_(saved[0])
        st["tokens"].copy_(saved[1])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step(st)
        torch.cuda.synchronize()
        # capture recorded but did not change state beyond what replay will redo; reset
        st["pos"].copy_(saved[0])
        st["tokens"].copy_(saved[1])
        st["graph"] = g
        self.capture_s[st["tokens"].shape[0]] = time.perf_counter() - t0
        self.reason = "decode step captured as a device graph"

    def generate(self, input_features: Any) -> Any:
        """Token ids (B, prompt + new_tokens), like ``generate(...)`` returns for Whisper."""
        import torch

        with torch.inference_mode():
            st = self.prefill(input_features)
            n = self.total - 1
            if self.use_graphs and st["graph"] is None:
                try:
                    self._capture(st)
                except Exception as e:  # same function, eagerly
                    self.use_graphs = False
                    self.reason = f"capture failed, eager: {type(e).__name__}: {str(e)[:200]}"
                    torch.cuda.synchronize()
                    st = self.prefill(input_features)
            if self.use_graphs:
                g = st["graph"]
                for _ in range(n):
                    g.replay()
            else:
                for _ in range(n):
                    self._step(st)
            return st["tokens"].clone()


def attach_to_workload(workload: Any, params: dict[str, Any]) -> FastWhisper:
    """Replace a stock ``WhisperWorkload``'s ``generate`` step with :class:`FastWhisper`.

    Uses the workload's own forced prompt and the generation rules of its generation config; the
    returned sequences are prompt + new tokens, which the workload's ``generated_ids`` strips.
    """
    t0 = time.perf_counter()
    gc = workload.model.generation_config
    fast = FastWhisper(
        workload.model,
        prompt_ids=list(workload.forced_prompt),
        new_tokens=int(workload.new_tokens),
        suppress_tokens=getattr(gc, "suppress_tokens", None),
        begin_suppress_tokens=getattr(gc, "begin_suppress_tokens", None),
        eos_token_id=getattr(gc, "eos_token_id", None),
        device=workload.device,
        graphs=bool(params.get("optimized_graphs", True)),
    )
    fast.notes = {"decode": "static KV cache, graph-captured step" if fast.use_graphs else "static KV cache, eager step"}
    workload.generate = fast.generate
    workload.compile_mode = "none (device graph)" if fast.use_graphs else "none"
    workload.optimized_setup_s = time.perf_counter() - t0
    return fast
