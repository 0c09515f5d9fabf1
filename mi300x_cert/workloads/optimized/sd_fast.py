"""Optimized Stable Diffusion path: the same function as the stock diffusers pipeline, run faster.

What changes (none of it changes the mathematics):

* channels-last memory format for UNet and VAE, fused QKV projections (one GEMM instead of three);
* ``torch.compile`` (fullgraph, one specialisation per batch size) of the UNet and the VAE decoder,
  with weight freezing (weights folded as constants of the compiled graph) and 1×1 convolutions as
  matrix products (``common.SD_INDUCTOR_DEFAULTS``; ``optimized_inductor`` adds or overrides);
* the whole denoising loop — every UNet evaluation, the classifier-free-guidance combination and
  the scheduler's own ``step`` — captured as ONE device graph per batch size. The scheduler's
  per-step coefficients are host scalars, so replaying the graph reproduces PNDM's multistep state
  (its ``ets`` history) exactly as captured; no host synchronisation remains inside the loop;
* the VAE decode captured as a second graph, and the CLIP text encoder (the workload's own eager
  module, not compiled: the same bits) as a third, so its small operations are not launched one
  by one from the host;
* in the ``fast`` UNet form, the time embedding of the whole plan computed once
  (``unet_fast.time_table``: every resnet's time term depends on the timestep alone), each step
  handing the UNet its row;
* every cross-attention's keys and values computed once per batch (``unet_fast.kv_table``: the text
  embeddings do not change over the loop), the UNet handed the table in place of the embeddings;
* where the UNet and VAE are compiled on an NVIDIA card, the ``fast`` UNet form of
  ``unet_fast.prepare_unet``: upsampling kept in the channels-last layout at every batch size, and
  the GroupNorms (+ SiLU, + the time embedding's add) of the UNet and of the VAE's resnets by its
  Triton kernels — at every size where the loop is replayed as a device graph, from 2²³ elements
  on where the host calls the model each step (``unet_form``: ``auto``, or one of
  ``unet_fast.UNET_FORMS`` to force one).

The scheduler code is diffusers' own (a fresh copy per capture), so the latents agree with the
stock pipeline to fp16 rounding; ``tests/unit/test_optimized.py`` checks this on the tiny model.
Schedulers whose ``step`` reads device values on the host (e.g. Euler's sigma test) run the same
loop without the whole-loop graph (compiled UNet only).
"""

from __future__ import annotations

import copy
import time
from typing import Any

from .common import SD_INDUCTOR_DEFAULTS, GraphCache, compile_module, graphs_supported, inductor_settings

__all__ = ["FastSD", "GRAPH_SAFE_SCHEDULERS"]

GRAPH_SAFE_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler")


class FastSD:
    """Encode + denoise + decode for one set of SD modules (unet, vae, scheduler; the text encoder
    as ``text_encode``) with the optimizations above.

    ``encode(ids)``, ``denoise(cond, uncond, latents)`` and ``decode(latents)`` compute what the
    stock pipeline computes for ``text_encode(ids)``, ``prompt_embeds=cond,
    negative_prompt_embeds=uncond, latents=latents`` and ``vae.decode(latents / scaling_factor)``.
    """

    def __init__(
        self,
        unet: Any,
        vae: Any,
        scheduler: Any,
        *,
        steps: int,
        guidance: float,
        scaling_factor: float,
        device: str,
        compile: bool = True,
        graphs: bool = True,
        channels_last: bool = True,
        fuse_qkv: bool = True,
        compile_mode: str = "default",
        sdpa_choice: str = "auto",
        latent_side: int | None = None,
        inductor: Any = None,
        unet_form: str = "auto",
        text_encode: Any = None,
    ) -> None:
        import torch

        from .unet_fast import (EAGER_KERNEL_MIN_ELEMENTS, check_unet_form, kernel_rule, kv_table, kv_table_refusal,
                                prepare_unet, time_table, time_table_refusal)

        check_unet_form(unet_form)

        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.steps, self.guidance, self.scaling_factor = int(steps), float(guidance), float(scaling_factor)
        self.device = device
        self.notes: dict[str, Any] = {}
        on_gpu = str(device).startswith("cuda")
        if channels_last and on_gpu:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
            self.notes["channels_last"] = True
        if fuse_qkv:
            for m in (unet, vae):
                if hasattr(m, "fuse_qkv_projections"):
                    m.fuse_qkv_projections()
            self.notes["fused_qkv"] = True
        hip = bool(getattr(torch.version, "hip", None))
        if unet_form == "auto":
            # measured on an H200 (docs/performance.md); not measured on ROCm, and the channels-last
            # upsampling relies on the compiled kernel
            unet_form = "fast" if compile and on_gpu and not hip else "library"
        self.unet_form = unet_form
        self.notes["unet_form"] = unet_form
        self.sched_name = type(scheduler).__name__
        self.use_graphs = bool(graphs) and graphs_supported(device) and self.sched_name in GRAPH_SAFE_SCHEDULERS
        if unet_form != "library":
            # where the loop is to be replayed as a device graph, the norms take the kernels at every
            # size; called from the host each step, small activations keep the library's ops (their
            # launches cost the host). Should a capture fail, the loop runs from the host with the
            # every-size rule (recorded: denoise_graph / decode_graph).
            rule = None if self.use_graphs else EAGER_KERNEL_MIN_ELEMENTS
            self.notes["unet_form_modules"] = {name: prepare_unet(m, unet_form, min_elements=rule)
                                               for name, m in (("unet", unet), ("vae", vae))}
            self.notes["unet_form_min_elements"] = kernel_rule(rule)
        # the plan's time embedding, once (the `fast` form's resnets read their columns of its rows)
        self._time_rows: Any = None
        self._table_ts: Any = None
        why = "only the fast UNet form takes it" if unet_form != "fast" else time_table_refusal(unet)
        if why is None:
            self._table_ts = self._plan_timesteps()
            self._time_rows = time_table(unet, self._table_ts)
        self.notes["time_table"] = True if self._time_rows is not None else why   # True, or why not
        # every cross-attention's keys and values of the (step-invariant) text embeddings, once per
        # batch (any UNet form with the fused projections: each cross-attention's to_kv takes its
        # columns of the table)
        self._kv_layers: Any = None
        why = "the projections are not fused (fuse_qkv off)" if not fuse_qkv else kv_table_refusal(unet)
        if why is None:
            self._kv_layers = kv_table(unet)
        self.notes["kv_table"] = True if self._kv_layers is not None else why   # True, or why not
        if on_gpu and sdpa_choice == "auto":
            from .common import pick_sdpa_backend

            heads = getattr(unet.config, "num_attention_heads", None) or unet.config.attention_head_dim
            heads = int(heads[0]) if isinstance(heads, (list, tuple)) else int(heads)
            c0 = int(unet.config.block_out_channels[0])
            side = int(unet.config.sample_size) if latent_side is None else int(latent_side)
            self.notes["sdpa"] = pick_sdpa_backend((16, heads), side * side, c0 // heads, unet.dtype, device)
        self.compile_label = "none"
        self._unet_fn: Any = unet
        self._decode_fn: Any = self._decode_eager
        if compile:
            opts = inductor_settings(inductor, SD_INDUCTOR_DEFAULTS)
            self.notes["inductor"] = opts if on_gpu else {}
            self._unet_fn, self.compile_label = compile_module(unet, device=device, mode=compile_mode, options=opts)
            self._decode_fn, _ = compile_module(self._decode_eager, device=device, mode=compile_mode, options=opts)
        self.notes["whole_loop_graph"] = self.use_graphs
        # the text encoder needs no scheduler: replayed wherever graphs are asked for and supported
        self._text_encode = text_encode
        self._text_graph = bool(graphs) and graphs_supported(device) and text_encode is not None
        self._encode_graphs = GraphCache(text_encode, self.device, warmup_runs=2, name="encode")
        self._denoise_graphs = GraphCache(self._denoise_eager, self.device, warmup_runs=1, name="denoise")
        self._decode_graphs = GraphCache(self._decode_fn, self.device, warmup_runs=2, name="decode")
        self.unet_evals = int(len(self._plan_timesteps()))
        self._ts_dev: dict[str, Any] = {}

    # -- the function -------------------------------------------------------------------------
    def _plan_timesteps(self) -> Any:
        """The scheduler's timesteps for ``steps`` (a fresh copy of it planned on the host)."""
        s = type(self.scheduler).from_config(self.scheduler.config)
        s.set_timesteps(self.steps, device="cpu")
        return s.timesteps.clone()

    def _denoise_eager(self, cond: Any, uncond: Any, latents: Any) -> Any:
        """The stock pipeline's loop (StableDiffusionPipeline.__call__ with latents given)."""
        import torch

        from .unet_fast import kv_rows

        # The scheduler runs on host scalars (timesteps on the CPU, coefficients as Python/CPU
        # values): no device->host read in the loop, so the loop can be captured as one graph.
        # The UNet gets the same timestep values as device tensors, staged once.
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(self.steps, device="cpu")
        key = str(latents.device)
        ts_dev = self._ts_dev.get(key)
        if ts_dev is None:
            ts_dev = self._ts_dev[key] = sched.timesteps.to(latents.device)
        do_cfg = self.guidance > 1.0
        emb = torch.cat([uncond, cond]) if do_cfg else cond
        if self._kv_layers is not None:   # the cross-attentions' keys and values, once for the loop
            emb = kv_rows(self._kv_layers, emb)
        rows = self._time_rows
        if rows is not None and not torch.equal(sched.timesteps, self._table_ts):
            raise RuntimeError(
                f"FastSD: the scheduler's timesteps ({len(sched.timesteps)}, from {sched.timesteps[:3].tolist()}) are "
                f"not the plan the time table was made for ({len(self._table_ts)}, from "
                f"{self._table_ts[:3].tolist()}); optimized_unet: library runs without the table")
        lat = latents * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([lat] * 2) if do_cfg else lat
            inp = sched.scale_model_input(inp, t)
            # the time table's row for this step (a view: no work in the loop), else the timestep
            t_in = ts_dev[i] if rows is None else rows[i:i + 1].expand(int(inp.shape[0]), -1)
            noise = self._unet_fn(inp, t_in, encoder_hidden_states=emb, return_dict=False)[0]
            if do_cfg:
                n_u, n_t = noise.chunk(2)
                noise = n_u + self.guidance * (n_t - n_u)
            lat = sched.step(noise, t, lat, return_dict=False)[0]
        return lat

    def _decode_eager(self, latents: Any) -> Any:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]

    def _replay(self, graphs: GraphCache, use_graph: bool, eager: Any, *inputs: Any, clone: bool = True) -> Any:
        """``eager(*inputs)``, or where ``use_graph`` its replay from ``graphs`` (captured on first
        use), the capture state noted as ``<graphs.name>_graph``."""
        if not use_graph:
            return eager(*inputs)
        out = graphs.run(*inputs, clone=clone)
        self.notes[f"{graphs.name}_graph"] = graphs.reason
        return out

    # -- public ---------------------------------------------------------------------------------
    def encode(self, ids: Any) -> Any:
        """``text_encode(ids)`` (the workload's text encoder), replayed as a device graph per batch
        shape; a copy of the graph's output is returned (the next replay overwrites it)."""
        import torch

        if self._text_encode is None:
            raise ValueError("FastSD.encode: no text encoder was given (text_encode=None)")
        with torch.inference_mode():
            return self._replay(self._encode_graphs, self._text_graph, self._text_encode, ids)

    def denoise(self, cond: Any, uncond: Any, latents: Any) -> Any:
        import torch

        with torch.inference_mode():
            if uncond is None:
                uncond = torch.zeros_like(cond)  # unused when guidance <= 1
            return self._replay(self._denoise_graphs, self.use_graphs, self._denoise_eager, cond, uncond, latents,
                                clone=False)

    def decode(self, latents: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self._replay(self._decode_graphs, self.use_graphs, self._decode_fn, latents)

    def generate(self, cond: Any, uncond: Any, latents: Any) -> Any:
        return self.decode(self.denoise(cond, uncond, latents))


def attach_to_workload(workload: Any, params: dict[str, Any]) -> FastSD:
    """Swap ``text_embeddings`` / ``denoise`` / ``decode`` of a stock ``SDWorkload`` for the FastSD
    versions."""
    t0 = time.perf_counter()
    inductor = params.get("optimized_inductor")
    inductor_settings(inductor)  # a bad key (parameter or $MI300X_CERT_INDUCTOR) fails before any work
    from .unet_fast import check_unet_form

    unet_form = check_unet_form(str(params.get("optimized_unet", "auto")), source="optimized_unet")
    hook = getattr(workload, "_hook", None)
    if hook is not None:  # a forward hook on the UNet would break fullgraph compile and graphs
        hook.remove()
        workload._hook = None
    fast = FastSD(
        workload.unet, workload.vae, workload.scheduler,
        steps=workload.steps, guidance=workload.guidance, scaling_factor=workload.scaling_factor,
        device=workload.device,
        compile=bool(params.get("optimized_compile", True)),
        graphs=bool(params.get("optimized_graphs", True)),
        sdpa_choice=str(params.get("optimized_sdpa", "auto")),
        latent_side=int(workload.height) // int(workload.vae_scale_factor),
        inductor=inductor,
        unet_form=unet_form,
        text_encode=workload.text_embeddings,
    )

    def denoise(cond: Any, uncond: Any, latents: Any) -> Any:
        workload._unet_calls = fast.unet_evals
        return fast.denoise(cond, uncond, latents)

    workload.denoise = denoise
    workload.text_embeddings = fast.encode
    workload.decode = fast.decode
    workload.fast = fast
    workload.compile_mode = fast.compile_label
    workload.optimized_setup_s = time.perf_counter() - t0
    return fast
