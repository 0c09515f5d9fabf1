"""Stable Diffusion (v1-4 architecture) text-to-image workload, stock diffusers path.

One batch = ``batch_size`` prompts → images, in three replaceable steps (the optimized path swaps
them or the modules behind them)::

    ids = self.tokenize(prompts)                 # host: CLIP tokenizer, or hash ids (synthetic)
    cond, uncond = self.encode_prompts(ids)      # device: CLIP text encoder (text_embeddings)
    latents = self.denoise(cond, uncond, g)      # device: StableDiffusionPipeline(..., output_type="latent")
    images = self.decode(latents)                # device: VAE decode → float images in [-1, 1]
    pil = self.to_pil(images)                    # host: → uint8 → host copy → PIL

``latency_s`` spans encode_prompts + denoise + decode (synchronized); ``latency_overhead_s``
spans the whole batch including prompt selection, tokenization, initial-noise creation and the
PIL conversion. See docs/workloads.md.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from ..errors import ModelSourceError, WorkerError
from .base import Workload, device_sync, repo_path, seeded_generator

__all__ = ["SDWorkload", "hash_tokenize", "SCHEDULERS"]

SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
HASH_TOKENIZER_NOTE = "hash (synthetic; no CLIP vocab)"
_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
DEFAULT_PROMPTS = ["a photograph of an astronaut riding a horse"]


def hash_tokenize(prompts: list[str], vocab_size: int, max_length: int = 77) -> list[list[int]]:
    """Deterministic stand-in for the CLIP tokenizer when no vocabulary files exist.

    Each lower-cased word/punctuation mark maps to ``sha256(word) mod (vocab_size - 2)``; the
    sequence is ``[BOS] + ids[:max_length-2] + [EOS]`` padded with EOS to ``max_length`` — the
    layout of SD v1-4's CLIP tokenizer (BOS = vocab-2 = 49406, EOS = pad = vocab-1 = 49407).
    """
    bos, eos = vocab_size - 2, vocab_size - 1
    out: list[list[int]] = []
    for p in prompts:
        words = _WORD_RE.findall(p.lower())
        ids = [int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "big") % (vocab_size - 2) for w in words]
        seq = [bos] + ids[: max_length - 2] + [eos]
        out.append(seq + [eos] * (max_length - len(seq)))
    return out


class SDWorkload(Workload):
    kind = "sd"
    PRELOAD = ("torch", "diffusers:AutoencoderKL,StableDiffusionPipeline,UNet2DConditionModel," + ",".join(SCHEDULERS.values()),
               "diffusers.models.attention_processor", "transformers:CLIPTextConfig,CLIPTextModel,CLIPTokenizer",
               "PIL.Image")

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        import torch

        p = self.params
        self.height = int(p.get("height", 512))
        self.width = int(p.get("width", 512))
        self.steps = int(p.get("steps", 50))
        self.guidance = float(p.get("guidance", 7.5))
        self.scheduler_name = str(p.get("scheduler", "pndm"))
        self.attention = str(p.get("attention", "sdpa"))
        if self.scheduler_name not in SCHEDULERS:
            raise WorkerError(f"scheduler {self.scheduler_name!r} is not one of {', '.join(SCHEDULERS)}")
        if self.attention not in ("sdpa", "eager"):
            raise WorkerError(f"attention {self.attention!r} is not one of sdpa, eager")
        if self.height % 8 or self.width % 8 or self.height <= 0 or self.width <= 0:
            raise WorkerError(f"height/width {self.height}x{self.width} must be positive multiples of 8")
        if self.steps <= 0:
            raise WorkerError(f"steps must be positive, got {self.steps}")
        self.prompts = self._read_prompts(p.get("prompts"))

        src = self.source
        what = "a Stable Diffusion pipeline directory"
        src.require("model_index.json", what=what)
        src.require("unet/config.json", "vae/config.json", "text_encoder/config.json", what=what)
        src.require_any(["scheduler/scheduler_config.json"], what=what)

        import diffusers
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        attn_impl = "sdpa" if self.attention == "sdpa" else "eager"
        d = src.path
        try:
            if src.synthetic:
                torch.manual_seed(self.seed)
                with self.synthetic_init():
                    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet"))
                    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae"))
                    text_encoder = CLIPTextModel._from_config(
                        CLIPTextConfig.from_pretrained(d / "text_encoder"), attn_implementation=attn_impl
                    )
            else:
                for sub in ("unet", "vae", "text_encoder"):
                    src.require_any(
                        [f"{sub}/{f}" for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                                 "model.safetensors", "pytorch_model.bin",
                                                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")],
                        what=f"{what} with {sub} weights",
                    )
                unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet", local_files_only=True)
                vae = AutoencoderKL.from_pretrained(d, subfolder="vae", local_files_only=True)
                text_encoder = CLIPTextModel.from_pretrained(
                    d, subfolder="text_encoder", local_files_only=True, attn_implementation=attn_impl
                )
            sched_cls = getattr(diffusers, SCHEDULERS[self.scheduler_name])
            scheduler = sched_cls.from_config(sched_cls.load_config(d / "scheduler"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelSourceError(f"cannot load Stable Diffusion from {src.label!r} ({d}): {e}") from e

        self.tokenizer = None
        self.tokenizer_note = HASH_TOKENIZER_NOTE
        tok_dir = d / "tokenizer"
        if not src.synthetic and any((tok_dir / f).exists() for f in ("vocab.json", "tokenizer.json")):
            from transformers import CLIPTokenizer

            try:
                self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ModelSourceError(f"cannot load the CLIP tokenizer in {tok_dir}: {e}") from e
            self.tokenizer_note = type(self.tokenizer).__name__

        if self.attention == "eager":
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
            vae.set_attn_processor(AttnProcessor())
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor2_0())
            vae.set_attn_processor(AttnProcessor2_0())

        for m in (unet, vae, text_encoder):
            m.to(self.device, dtype=self.dtype)
            m.eval()
            m.requires_grad_(False)

        self.unet, self.vae, self.text_encoder, self.scheduler = unet, vae, text_encoder, scheduler
        self.pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=self.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(unet.config.in_channels)
        self.vocab_size = int(text_encoder.config.vocab_size)
        self.max_length = int(text_encoder.config.max_position_embeddings)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.unet_evals_measured: int | None = None
        self._unet_calls = 0
        self._hook = unet.register_forward_pre_hook(self._count_unet)

    def _count_unet(self, module: Any, args: Any) -> None:
        self._unet_calls += 1

    def _read_prompts(self, value: Any) -> list[str]:
        if value is None:
            return list(DEFAULT_PROMPTS)
        if isinstance(value, (list, tuple)):
            prompts = [str(x) for x in value if str(x).strip()]
        else:
            path = repo_path(value)
            if not path.is_file():
                raise WorkerError(f"prompts file {str(value)!r} does not exist")
            prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
        if not prompts:
            raise WorkerError(f"prompts {value!r} contain no prompt")
        return prompts

    # -- the replaceable steps -------------------------------------------------------------
    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance (guidance > 1) runs the UNet on a doubled batch (cond + uncond)."""
        return self.guidance > 1.0

    def select_prompts(self, batch_size: int, batch_index: int) -> list[str]:
        start = max(batch_index, 0) * batch_size
        return [self.prompts[(start + i) % len(self.prompts)] for i in range(batch_size)]

    def tokenize(self, prompts: list[str]) -> Any:
        """Token ids (batch × 77) on the device for ``prompts`` followed by as many empty prompts
        when CFG is on (the unconditional half)."""
        import torch

        texts = list(prompts) + ([""] * len(prompts) if self.do_cfg else [])
        if self.tokenizer is not None:
            ids = self.tokenizer(
                texts, padding="max_length", max_length=min(int(self.tokenizer.model_max_length), self.max_length),
                truncation=True, return_tensors="pt",
            ).input_ids
        else:
            ids = torch.tensor(hash_tokenize(texts, self.vocab_size, self.max_length), dtype=torch.long)
        return ids.to(self.device)

    def text_embeddings(self, ids: Any) -> Any:
        """CLIP text encoder: token ids → its last hidden state (the optimized path replays this as a
        device graph)."""
        import torch

        with torch.inference_mode():
            return self.text_encoder(ids)[0]

    def encode_prompts(self, ids: Any) -> tuple[Any, Any]:
        """CLIP text encoder → (prompt_embeds, negative_prompt_embeds or None)."""
        import torch

        with torch.inference_mode():
            emb = self.text_embeddings(ids).to(self.dtype)
        if self.do_cfg:
            b = emb.shape[0] // 2
            return emb[:b], emb[b:]
        return emb, None

    def initial_latents(self, batch_size: int, batch_index: int) -> Any:
        """Seeded initial noise (made on the CPU so every device starts from the same latents)."""
        import torch

        shape = (batch_size, self.latent_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)
        lat = torch.randn(shape, generator=seeded_generator(self.seed, batch_index), dtype=torch.float32)
        return lat.to(self.device, dtype=self.dtype)

    def denoise(self, prompt_embeds: Any, negative_prompt_embeds: Any, latents: Any) -> Any:
        """The stock diffusers denoising loop (scheduler steps × UNet), returning latents."""
        import torch

        with torch.inference_mode():
            out = self.pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                height=self.height, width=self.width,
                num_inference_steps=self.steps, guidance_scale=self.guidance,
                latents=latents, output_type="latent", return_dict=True,
            )
        return out.images

    def decode(self, latents: Any) -> Any:
        """VAE decode → image tensor in [-1, 1] (batch × 3 × H × W) on the device."""
        import torch

        with torch.inference_mode():
            return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]

    @staticmethod
    def to_pil(images: Any) -> list[Any]:
        """[-1, 1] float tensor → uint8 on the device → host copy → PIL images."""
        import torch
        from PIL import Image

        with torch.inference_mode():
            u8 = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            arr = u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    # -- one batch ---------------------------------------------------------------------------
    def prepare(self, batch_size: int, batch_index: int) -> Any:
        prompts = self.select_prompts(batch_size, batch_index)
        return self.tokenize(prompts), self.initial_latents(batch_size, batch_index)

    def compute(self, inputs: Any) -> Any:
        return self._steps(inputs)

    def _steps(self, inputs: Any, mark: Any = None) -> Any:
        """The batch's three device steps; ``mark(step)`` after each where given (:meth:`time_phases`)."""
        ids, latents0 = inputs
        self._unet_calls = 0
        cond, uncond = self.encode_prompts(ids)
        if mark:
            mark("encode")
        latents = self.denoise(cond, uncond, latents0)
        if mark:
            mark("denoise")
        images = self.decode(latents)
        if mark:
            mark("decode")
        return images

    def time_phases(self, batch_size: int, batch_index: int) -> dict[str, float]:
        """One batch of :meth:`compute` with the device synchronised around each of its three device
        steps: seconds of ``encode`` (text encoder), ``denoise`` (the loop) and ``decode`` (VAE).
        Where the time of an image goes; the synchronisations add a little to the sum, so
        :meth:`run_batch`'s ``latency_s`` stays the figure."""
        inputs = self.prepare(self._check_batch(batch_size), batch_index)
        marks: list[tuple[str, float]] = []

        def mark(step: str) -> None:
            device_sync(self.device)
            marks.append((step, time.perf_counter()))

        mark("start")
        self._steps(inputs, mark)
        return {step: t - marks[i][1] for i, (step, t) in enumerate(marks[1:])}

    def collect(self, outputs: Any, inputs: Any, batch_size: int) -> dict[str, Any]:
        self.last_images = self.to_pil(outputs)
        evals = self._unet_calls or self.expected_unet_evals()
        self.unet_evals_measured = evals
        return {"unet_evals": evals, "steps": self.steps}

    # -- conditions ----------------------------------------------------------------------------
    def expected_unet_evals(self) -> int:
        """UNet evaluations the scheduler plans for ``steps`` (PNDM: steps + 1)."""
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(self.steps, device="cpu")
        return int(len(sched.timesteps))

    def attention_backend(self) -> str:
        """The attention processors the UNet actually holds (truthful after the optimized path swaps them)."""
        try:
            names = sorted({type(proc).__name__ for proc in self.unet.attn_processors.values()})
        except AttributeError:  # a replaced / compiled UNet without the diffusers attribute
            names = []
        label = ", ".join(names) or "unknown"
        if names == ["AttnProcessor2_0"]:
            label += " (torch.nn.functional.scaled_dot_product_attention)"
        elif names == ["AttnProcessor"]:
            label += " (eager matmul + softmax)"
        return label

    def _work(self) -> dict[str, Any]:
        """FLOPs of one image: text encoder (CFG: two prompts) + every UNet evaluation (CFG: a pair)
        + VAE decode, each counted once on its eager module and multiplied out."""
        import torch

        unet = getattr(self.unet, "_orig_mod", self.unet)
        vae = getattr(self.vae, "_orig_mod", self.vae)
        text = getattr(self.text_encoder, "_orig_mod", self.text_encoder)
        pair = 2 if self.do_cfg else 1
        h, w = self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        ids = torch.zeros((pair, self.max_length), dtype=torch.long, device=self.device)
        t_flops = self.count_flops(lambda: text(ids))
        hidden = torch.zeros((pair, self.max_length, int(text.config.hidden_size)), device=self.device, dtype=self.dtype)
        lat = torch.zeros((pair, self.latent_channels, h, w), device=self.device, dtype=self.dtype)
        step = torch.tensor(1, device=self.device)
        u_flops = self.count_flops(lambda: unet(lat, step, encoder_hidden_states=hidden))
        v_flops = self.count_flops(lambda: vae.decode(lat[:1]))
        evals = self.unet_evals_measured or self.expected_unet_evals()
        return {"flops_per_item": t_flops + evals * u_flops + v_flops, "per": "image", "against": "matrix_tflops",
                "unet_flops_per_eval": u_flops, "unet_evals": evals, "vae_decode_flops": v_flops,
                "text_encoder_flops": t_flops}

    def _conditions(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler_name,
            "scheduler_class": type(self.scheduler).__name__,
            "steps": self.steps,
            "unet_evals": self.unet_evals_measured or self.expected_unet_evals(),
            "guidance": self.guidance,
            "cfg": self.do_cfg,
            "unet_batch_factor": 2 if self.do_cfg else 1,
            "height": self.height,
            "width": self.width,
            "attention": self.attention,
            "attention_backend": self.attention_backend(),
            "tokenizer": self.tokenizer_note,
            "prompts": len(self.prompts),
            "latency_counts": "text encoder + denoising + VAE decode",
            "overhead_counts": "prompt selection, tokenization, initial noise, uint8/PIL conversion, host copy",
        }
