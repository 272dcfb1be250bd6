"""The training loop: GAN + VAE training of :class:`SVCModel`, checkpoints, exact resume, fine-tuning, TensorBoard.

The trainer knows nothing of MLflow or Dagster: anything that wants to follow a run attaches a
:class:`TrainerCallback`.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from svc_model.config import SVCConfig
from svc_model.data import SegmentDataset, StepBatches, collate
from svc_model.features.base import pick_device
from svc_model.model import SVCModel
from svc_model.model.discriminators import Discriminator
from svc_model.model.losses import (
    MultiResolutionSTFTLoss,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    kl_forward,
    kl_reverse,
    mel_loss,
    speaker_loss,
)
from svc_model.model.modules import ItemNoise, slice_segments
from svc_model.model.spectral import LinearSpectrogram, LogMelSpectrogram

CHECKPOINT_GLOB = "step-*.pt"


class TrainerCallback:
    """Hooks a tracking layer can implement. Called on rank 0 only."""

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_step(self, step: int, losses: dict[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: dict[str, float], samples: list[dict]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_end(self, trainer: "Trainer") -> None: ...


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain containers, so a checkpoint loads with ``weights_only=True``
    (numpy's own state tuple holds an ndarray, which only a full unpickle can rebuild)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # else numpy's own tuple, from a checkpoint written before the dict form
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU.
    Returns the rank's device."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; start at "
                               f"most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`svc_model.storage.atomic_path`: a crash never leaves a truncated checkpoint."""
    from svc_model.storage import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            try:
                torch.save(obj, fh)
            except RuntimeError as exc:
                # On a full disk torch reports "unexpected pos 704 vs 598"; the file's OSError (ENOSPC) says why.
                if isinstance(exc.__context__, OSError):
                    raise exc.__context__ from exc
                raise
            fh.flush()
            os.fsync(fh.fileno())  # else a full disk can surface only at writeback, after the rename


def checkpoints(directory: Path) -> list[Path]:
    """The ``step-*.pt`` checkpoints in ``directory``, oldest step first (files moved aside are not matched)."""
    found = [p for p in Path(directory).glob(CHECKPOINT_GLOB) if p.stem.split("-")[-1].isdigit()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(Path(path).stem.split("-")[1])


def move_aside(path: Path) -> Path:
    """Rename an unloadable checkpoint to ``<name>.corrupt`` (``.corrupt-2``... if taken): out of the resume scan,
    kept for inspection, never deleted."""
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    os.replace(path, target)
    return target


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[SVCModel, SVCConfig, dict]:
    """An :class:`SVCModel` in eval mode from a model folder (a registered version: safetensors + JSON), its
    ``generator.safetensors``, or a training checkpoint ``.pt`` (``weights_only=True``), with its config and the
    checkpoint's extras. Nothing is unpickled: a file holding a pickled object is refused, naming it."""
    from svc_model.weights import CheckpointError, read_checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ckpt = read_checkpoint(path, device)
    try:
        cfg = SVCConfig.model_validate(ckpt["config"])
    except Exception as exc:  # a foreign or damaged config
        raise CheckpointError(f"{path}: not a VoiceCraft SVC checkpoint ({type(exc).__name__}: {exc})") from exc
    model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1, cfg.audio.sample_rate)
    model.load_state_dict(ckpt["generator"])
    return model.to(device).eval(), cfg, ckpt


class Trainer:
    """Train from scratch, resume exactly from ``out_dir``'s latest checkpoint, or fine-tune from ``init_from``.

    ``manifest`` is a training manifest (see :mod:`svc_model.data`); rows with ``split == "valid"`` are held out
    for validation audio and metrics.
    """

    def __init__(self, cfg: SVCConfig, manifest: pd.DataFrame, out_dir: str | Path, *, device: str = "auto",
                 init_from: str | Path | None = None, resume: bool = True,
                 callbacks: Iterable[TrainerCallback] = (), log: Callable[[str], None] = print,
                 tensorboard: bool = True, warn: Callable[[str], None] | None = None):
        from svc_model.storage import sweep_stale_temps

        self.cfg, self.log = cfg, log
        self.warn = warn if warn is not None else (lambda message: log(f"warning: {message}"))
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Under torchrun (WORLD_SIZE > 1): DistributedDataParallel, each rank a shard of every global batch; rank
        # 0 alone validates, logs, calls back and writes checkpoints and history.
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.distributed = self.world_size > 1
        self.device = pick_device(device)
        if self.distributed:
            self.device = init_distributed(self.device)
        # Half-written checkpoints or history of a killed run (their writer's pid is gone).
        for stale in (sweep_stale_temps(self.out_dir) if self.rank == 0 else []):
            log(f"removed {stale.name}, left by a killed writer")
        self.callbacks = list(callbacks) if self.rank == 0 else []
        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        set_seed(t.seed)
        self._check_manifest(manifest)
        self.train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
        self.valid_rows = manifest[manifest["split"] == "valid"].reset_index(drop=True)
        if self.train_rows.empty:
            raise ValueError("the training manifest has no 'train' rows")
        self.speaker_encoder = manifest_speaker_encoder(manifest)
        self.singers = singer_table(manifest, self.speaker_encoder)
        hop = cfg.spectrogram.hop
        self.segment_frames = t.segment_size // hop
        self.dataset = SegmentDataset(self.train_rows, hop, t.max_frames, use_vec=cfg.model.vec_dim > 0)

        spec_channels = cfg.spectrogram.n_fft // 2 + 1
        self.generator = SVCModel(cfg.model, spec_channels, cfg.audio.sample_rate).to(self.device)
        m = cfg.model
        self.discriminator = Discriminator(m.mpd_periods, m.mrd_resolutions, m.mpd_channels, m.mrd_channels,
                                           m.msd_channels).to(self.device)
        s = cfg.spectrogram
        self.linear_spec = LinearSpectrogram(s.n_fft, s.hop, s.win).to(self.device)
        self.mel = LogMelSpectrogram(cfg.audio.sample_rate, s.n_fft, s.hop, s.win, s.n_mels, s.fmin, s.fmax).to(self.device)
        self.stft_loss = MultiResolutionSTFTLoss(cfg.model.mrd_resolutions).to(self.device)
        self.speaker_embedder = None
        if t.loss_weights.output_similarity > 0:  # optional; resemblyzer is a heavy import
            from svc_model.model.speaker import SpeakerEmbedder

            self.speaker_embedder = SpeakerEmbedder(cfg.audio.sample_rate).to(self.device)
        opt = dict(lr=t.learning_rate, betas=tuple(t.betas), eps=t.eps)
        self.optim_g = torch.optim.AdamW(self.generator.parameters(), **opt)
        self.optim_d = torch.optim.AdamW(self.discriminator.parameters(), **opt)
        # bf16 where the GPU has it (no loss scaling needed), else fp16 with a scaler; full precision on the CPU.
        self.amp = t.fp16 and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.step = 0
        self.init_from = None
        self.base_lr = t.learning_rate
        self.resumed_from: Path | None = self._resume() if resume and self.rank == 0 else None
        if self.distributed and resume:  # rank 0 chose (and set aside what it could not load); the others follow
            import torch.distributed as dist

            chosen = [str(self.resumed_from) if self.resumed_from is not None else None]
            dist.broadcast_object_list(chosen, src=0)
            if self.rank != 0 and chosen[0] is not None:
                self.resumed_from = Path(chosen[0])
                self._restore(self.resumed_from, restore_rng=False)
        if self.resumed_from is not None:
            self._trim_history()
            log(f"resuming from step {self.step} (checkpoint {self.resumed_from})")
        elif init_from is not None:
            self._init_weights(Path(init_from))
            self.base_lr = t.fine_tune_learning_rate
            log(f"fine-tuning from {init_from} at learning rate {self.base_lr:g}")
        # The networks as the training step calls them: wrapped for gradient averaging across ranks. Checkpoints,
        # validation and conversion use the plain modules (no "module." prefixes).
        self.generator_step, self.discriminator_step = self.generator, self.discriminator
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.generator_step = DistributedDataParallel(self.generator, device_ids=ids)
            self.discriminator_step = DistributedDataParallel(self.discriminator, device_ids=ids)
            set_seed(t.seed + self.rank)  # dropout masks differ across ranks (ItemNoise draws do not depend on it)
        self.writer = None
        if tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    # ---- state -----------------------------------------------------------------------------------------------
    def _check_manifest(self, manifest: pd.DataFrame) -> None:
        missing = {"segment_id", "split", "audio", "pitch", "ppg", "vec", "speaker"} - set(manifest.columns)
        if missing:
            raise ValueError(f"training manifest lacks columns {sorted(missing)}")
        row = manifest.iloc[0]
        checks = [("ppg", self.cfg.model.ppg_dim, "model.ppg_dim")]
        if self.cfg.model.vec_dim:  # a model without the vec path never reads vec
            checks.append(("vec", self.cfg.model.vec_dim, "model.vec_dim"))
        for column, expected, name in checks:
            dim = np.load(row[column], mmap_mode="r").shape[-1]
            if dim != expected:
                raise ValueError(f"{row[column]}: {column} features are {dim}-d but {name} is {expected}; "
                                 f"set {name}: {dim} or rebuild the features")

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": self.cfg.model_dump(mode="json"),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optim_g": self.optim_g.state_dict(), "optim_d": self.optim_d.state_dict(),
            "base_lr": self.base_lr,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "init_from": str(self.init_from) if self.init_from else None,
            "singers": self.singers,
            "speaker_encoder": self.speaker_encoder,
        }

    def _resume(self) -> Path | None:
        """Restore the newest loadable checkpoint of ``out_dir``. One that cannot be read (truncated by a kill,
        overwritten, missing state) is moved aside to ``*.corrupt`` with a warning naming it, and the previous one
        is tried; with none loadable, training starts over (with a warning)."""
        found = checkpoints(self.out_dir)
        for path in reversed(found):
            try:
                self._restore(path)
                return path
            except (MemoryError, torch.OutOfMemoryError, KeyboardInterrupt):
                raise  # the machine's problem, not the file's
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                aside = move_aside(path)
                self.warn(f"{path}: checkpoint cannot be loaded ({type(exc).__name__}: {exc}); moved it to "
                          f"{aside.name} and trying the previous one")
        if found:
            self.warn(f"{self.out_dir}: none of the {len(found)} checkpoint(s) could be loaded (moved aside as "
                      f"*.corrupt); starting over from step 0")
        return None

    def _check_restorable(self, path: Path, ckpt) -> None:
        """Everything :meth:`_restore` applies is present and fits this trainer's networks, checked before any of
        it is applied: a bad file then changes nothing, and the resume can fall back to an older one."""
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: not a training checkpoint (a {type(ckpt).__name__})")
        missing = {"step", "generator", "discriminator", "optim_g", "optim_d", "scaler", "rng"} - set(ckpt)
        if missing:
            raise ValueError(f"{path}: training state lacks {sorted(missing)}")
        for name, net in (("generator", self.generator), ("discriminator", self.discriminator)):
            ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
            theirs = {k: tuple(getattr(v, "shape", ())) for k, v in dict(ckpt[name]).items()}
            if ours != theirs:
                raise ValueError(f"{path}: its {name} does not match this config's model section")
        for name, optim in (("optim_g", self.optim_g), ("optim_d", self.optim_d)):
            groups = ckpt[name].get("param_groups", []) if isinstance(ckpt[name], dict) else []
            if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optim.param_groups]:
                raise ValueError(f"{path}: its {name} state does not match this model's parameters")
        int(ckpt["step"])

    def _restore(self, path: Path, restore_rng: bool = True) -> None:
        from svc_model.weights import load_torch_file

        ckpt = load_torch_file(path, self.device)
        self._check_restorable(path, ckpt)
        self.generator.load_state_dict(ckpt["generator"])
        self.discriminator.load_state_dict(ckpt["discriminator"])
        self.optim_g.load_state_dict(ckpt["optim_g"])
        self.optim_d.load_state_dict(ckpt["optim_d"])
        self.base_lr = float(ckpt.get("base_lr", self.cfg.train.learning_rate))
        self.scaler.load_state_dict(ckpt["scaler"])
        if restore_rng:
            set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.init_from = ckpt.get("init_from")

    def _init_weights(self, path: Path) -> None:
        """Fine-tuning: weights of both networks from ``path`` (a training checkpoint, or a model folder whose
        discriminator comes from its ``training_state.pt`` where it has one); fresh optimizers, step 0."""
        from svc_model.weights import read_checkpoint

        if not path.exists():
            raise FileNotFoundError(f"{path}: base checkpoint for fine-tuning not found")
        ckpt = read_checkpoint(path, self.device, training_state=True)
        check_speaker_encoder(ckpt.get("speaker_encoder"), self.speaker_encoder, f"{path}: base model",
                              "this training set")
        try:
            self.generator.load_state_dict(ckpt["generator"])
            if "discriminator" in ckpt:
                self.discriminator.load_state_dict(ckpt["discriminator"])
        except RuntimeError as exc:
            raise ValueError(f"{path}: its model does not match this config's model section ({exc})") from exc
        self.init_from = path

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        path = self.out_dir / f"step-{self.step:08d}.pt"
        atomic_save(self.state_dict(), path)
        old = checkpoints(self.out_dir)
        for stale in old[: -self.cfg.train.keep_checkpoints]:
            stale.unlink(missing_ok=True)
        for cb in self.callbacks:
            cb.on_checkpoint(self.step, path)
        return path

    def _trim_history(self) -> None:
        """On resume, drop history lines past the restored step (logged by a run killed after its last
        checkpoint) and a line torn by the kill. Training only ever appends to the file; this rewrite replaces it
        atomically, so a second kill leaves the old file or the trimmed one."""
        from svc_model.storage import atomic_write_text

        path = self.out_dir / "history.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ---- one step --------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if v is not None else None) for k, v in batch.items()}

    def epoch(self, step: int | None = None) -> int:
        """Passes over the training segments completed before ``step`` (all ranks' batches count)."""
        step = self.step if step is None else step
        return step * self.cfg.train.batch_size * self.world_size // len(self.dataset)

    def learning_rate(self, step: int | None = None) -> float:
        """The anchor's schedule: ``lr * lr_decay ** epoch``, a pure function of the step (nothing to restore)."""
        return self.base_lr * self.cfg.train.lr_decay ** self.epoch(step)

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One generator + discriminator update. Returns detached 0-d tensors (on the device: reading them is
        the caller's choice, so a GPU step does not wait for the host)."""
        w, t = self.cfg.train.loss_weights, self.cfg.train
        hop = self.cfg.spectrogram.hop
        # Each item's random draws from its own stream: a global batch split over ranks trains as one process.
        noise = ItemNoise(batch["seeds"].tolist(), self.device)
        batch = self._to_device(batch)
        lr = self.learning_rate()
        for optim in (self.optim_g, self.optim_d):
            for group in optim.param_groups:
                group["lr"] = lr
        self.generator.train()
        self.discriminator.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            spec = self.linear_spec(batch["audio"])
            out = self.generator_step(batch["ppg"], batch["vec"], batch["f0"], spec, batch["speaker"],
                                      batch["lengths"], self.segment_frames, noise=noise)
            y = slice_segments(batch["audio"].unsqueeze(1), out.slice_starts * hop, self.segment_frames * hop)
            y_hat = out.audio

            # Discriminator: real to 1, generated to 0 (averaged over the sub-discriminators, as the anchor). One
            # pass over real and generated together: DDP reduces once per forward.
            real, fake = split_batch(self.discriminator_step(torch.cat([y, y_hat.detach()])), y.shape[0])
            loss_d = discriminator_loss([s for _, s in real], [s for _, s in fake])
        self.optim_d.zero_grad(set_to_none=True)
        self.scaler.scale(loss_d).backward()
        self.scaler.unscale_(self.optim_d)
        grad_d = torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), t.grad_clip)
        self.scaler.step(self.optim_d)

        # The plain discriminator: its gradients from the generator's loss are discarded (zeroed before its next
        # update), so they are not reduced across ranks.
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            real = self.discriminator(y)
            fake = self.discriminator(y_hat)
            losses = {
                "mel": mel_loss(self.mel(y_hat.squeeze(1)), self.mel(y.squeeze(1))),
            }
            sc, mag = self.stft_loss(y_hat, y)
            losses["stft"] = sc + mag
            losses["kl_forward"] = kl_forward(out.z_p, out.logs_q, out.m_p, out.logs_p, out.mask, out.logdet_forward)
            losses["kl_reverse"] = kl_reverse(out.z_q, out.logs_p, out.m_q, out.logs_q, out.mask, out.logdet_reverse)
            losses["adversarial"] = generator_adversarial_loss([s for _, s in fake])
            losses["feature_matching"] = feature_matching_loss([f for f, _ in real], [f for f, _ in fake])
            # The classifier learns to name the speaker; the reversed gradient strips timbre from the prior.
            losses["speaker"] = speaker_loss(out.speaker_pred, batch["speaker"])
            kl = self.kl_scale()
            total = (w.mel * losses["mel"] + w.stft * losses["stft"] + kl * w.kl_forward * losses["kl_forward"]
                     + kl * w.kl_reverse * losses["kl_reverse"] + w.adversarial * losses["adversarial"]
                     + w.feature_matching * losses["feature_matching"] + w.speaker * losses["speaker"])
            if self.speaker_embedder is not None:
                losses["output_similarity"] = speaker_loss(self.speaker_embedder(y_hat), batch["speaker"])
                total = total + w.output_similarity * losses["output_similarity"]
        self.optim_g.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optim_g)
        grad_g = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), t.grad_clip)
        self.scaler.step(self.optim_g)
        self.scaler.update()
        self.step += 1
        result = {k: v.detach().float() for k, v in losses.items()}
        result.update(generator_total=total.detach().float(), discriminator=loss_d.detach().float(),
                      grad_norm_g=grad_g.detach().float(), grad_norm_d=grad_d.detach().float(),
                      lr=torch.tensor(lr))
        return result

    # ---- validation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, max_items: int = 4) -> tuple[dict[str, float], list[dict]]:
        """Reconstruct held-out segments through the prior (as conversion does, same speaker): mel L1, how well
        the output's pitch (pYIN) follows the f0 it was given, and the audio."""
        rows = self.valid_rows if not self.valid_rows.empty else self.train_rows
        dataset = SegmentDataset(rows.head(max_items), self.cfg.spectrogram.hop, max_frames=1500,
                                 use_vec=self.cfg.model.vec_dim > 0)
        self.generator.eval()
        # Fixed noise for comparable figures, and the training RNG left exactly as it was.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            return self._validate(dataset, rows)

    def _validate(self, dataset, rows) -> tuple[dict[str, float], list[dict]]:
        from svc_model.evaluate import pitch_following

        mels, follows, samples = [], [], []
        for i in range(len(dataset)):
            item = dataset.load(i)
            batch = self._to_device(collate([item]))
            audio = self.generator.infer(batch["ppg"], batch["vec"], batch["f0"], batch["speaker"])[0, 0]
            n = min(len(audio), batch["audio"].shape[1])
            mel_hat, mel_ref = self.mel(audio[None, :n]), self.mel(batch["audio"][:, :n])
            mels.append(float(mel_loss(mel_hat, mel_ref)))
            # Does the output sing the f0 it was given? A decoder drifting into a frame-rate buzz shows here
            # (as 100 Hz) long before anyone listens.
            follows.append(pitch_following(batch["f0"][0].float().cpu().numpy(), audio.float().cpu().numpy(),
                                           self.cfg.audio.sample_rate, self.cfg.spectrogram.hop))
            samples.append({"segment_id": rows.iloc[i]["segment_id"], "audio": audio[:n].float().cpu().numpy(),
                            "reference": batch["audio"][0, :n].cpu().numpy(),
                            "mel": mel_hat[0].float().cpu().numpy(), "mel_reference": mel_ref[0].cpu().numpy()})
        followed = [f for f in follows if not np.isnan(f)]
        return {"valid_mel": float(np.mean(mels)) if mels else float("nan"),
                "valid_f0_corr": float(np.mean(followed)) if followed else float("nan")}, samples

    def _log_validation(self, metrics: dict, samples: list[dict]) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"valid/{k}", v, self.step)
            for i, s in enumerate(samples):
                self.writer.add_audio(f"valid/{i}/generated", s["audio"], self.step, self.cfg.audio.sample_rate)
                if self.step <= self.cfg.train.validate_every:
                    self.writer.add_audio(f"valid/{i}/reference", s["reference"], self.step, self.cfg.audio.sample_rate)
                self.writer.add_image(f"valid/{i}/mel", mel_image(s["mel"]), self.step, dataformats="HWC")
        for cb in self.callbacks:
            cb.on_validation(self.step, metrics, samples)

    # ---- the loop --------------------------------------------------------------------------------------------
    def kl_scale(self) -> float:
        """The KL weights' factor this step: a linear ramp over ``kl_warmup_steps`` when training from scratch.
        Without it the posterior collapses onto the prior before the decoder learns to read it (the tiny profile
        then ignores the content altogether); a fine-tuned model already reads its latent, so it never ramps."""
        warmup = self.cfg.train.kl_warmup_steps
        if not warmup or self.init_from is not None:
            return 1.0
        return min(1.0, (self.step + 1) / warmup)

    def fit(self, steps: int | None = None) -> TrainResult:
        """Train until ``cfg.train.steps`` (or for ``steps`` more). Checkpoints every ``checkpoint_every`` steps
        and at the end, so a stopped run resumes where it left off."""
        t = self.cfg.train
        target = self.step + steps if steps is not None else t.steps
        sampler = StepBatches(len(self.dataset), t.batch_size, t.seed, self.step, max(0, target - self.step),
                              self.rank, self.world_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=0 if t.deterministic else t.num_workers,
            collate_fn=lambda items: collate(items, self.segment_frames),
            # Its own generator: a new loader must not draw from the global RNG, or a resumed run diverges.
            generator=torch.Generator().manual_seed(t.seed))
        for cb in self.callbacks:
            cb.on_start(self)
        result = TrainResult(step=self.step, checkpoint=None)
        started = time.perf_counter()
        last = None
        pending: list[tuple[int, dict[str, torch.Tensor]]] = []

        def flush() -> None:
            """Read the buffered losses in one device->host copy, then log them: the only host sync of a step."""
            if not pending:
                return
            names = list(pending[0][1])
            stacked = torch.stack([torch.stack([v[n].to(self.device) for n in names]) for _, v in pending])
            if self.distributed:  # the global batch's losses: the mean of the ranks' (equal-sized) shards
                import torch.distributed as dist

                dist.all_reduce(stacked)
                stacked = stacked / self.world_size
            values = stacked.cpu().tolist()
            lines = []
            for (step, _), row in zip(pending, values):
                losses = dict(zip(names, row))
                result.history.append({"step": step, **losses})
                lines.append(json.dumps({"step": step, **losses}) + "\n")
                if self.writer is not None:
                    for k, v in losses.items():
                        self.writer.add_scalar(f"train/{k}", v, step)
                for cb in self.callbacks:
                    cb.on_step(step, losses)
            if self.rank == 0:
                with (self.out_dir / "history.jsonl").open("a") as fh:
                    fh.writelines(lines)
            pending.clear()
            rate = (time.perf_counter() - started) / max(1, len(result.history))
            self.log(f"step {step}/{target}  mel {losses['mel']:.3f}  stft {losses['stft']:.3f}  "
                     f"kl {losses['kl_forward']:.3f}/{losses['kl_reverse']:.3f}  spk {losses['speaker']:.3f}  "
                     f"adv {losses['adversarial']:.3f}  d {losses['discriminator']:.3f}  lr {losses['lr']:.2e}  "
                     f"({rate:.2f} s/step)")

        for batch in loader:
            pending.append((self.step + 1, self.train_step(batch)))
            if self.step % t.log_every == 0 or self.step == target:
                flush()
            if self.step % t.validate_every == 0:
                flush()
                if self.rank == 0:
                    metrics, samples = self.validate()
                    result.validation = metrics
                    self._log_validation(metrics, samples)
            if self.step % t.checkpoint_every == 0:
                flush()
                last = self.save_checkpoint()
        flush()
        if result.history and self.step % t.validate_every != 0 and self.rank == 0:  # always end validated
            metrics, samples = self.validate()
            result.validation = metrics
            self._log_validation(metrics, samples)
        if self.rank == 0 and (last is None or int(last.stem.split("-")[1]) != self.step):
            last = self.save_checkpoint()
        result.step, result.checkpoint = self.step, last
        result.seconds = time.perf_counter() - started
        if self.writer is not None:
            self.writer.flush()
        for cb in self.callbacks:
            cb.on_end(self)
        return result

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def split_batch(outputs: list, n: int) -> tuple[list, list]:
    """The discriminator's ``[(feature maps, score), ...]`` for a batch of ``[first n; rest]`` -> the two halves."""
    first = [([f[:n] for f in feats], score[:n]) for feats, score in outputs]
    rest = [([f[n:] for f in feats], score[n:]) for feats, score in outputs]
    return first, rest


def manifest_speaker_encoder(manifest: pd.DataFrame) -> str:
    """The one speaker encoder whose embeddings a training manifest holds ("" if the store predates the record).
    Two encoders' embeddings live in different spaces: a manifest that mixes them is refused."""
    if "speaker_encoder" not in manifest:
        return ""
    found = sorted({str(e) for e in manifest["speaker_encoder"].fillna("")})
    if len(found) > 1:
        per = manifest.groupby("speaker_encoder")["singer"].unique().to_dict()
        raise ValueError(f"the training set mixes speaker encoders {per}; rebuild speaker_embedding for every "
                         f"singer with one features.speaker setting")
    return found[0] if found else ""


def same_speaker_encoder(a: str | None, b: str | None) -> bool:
    """Equal encoder ids; an id without a weights hash (``mozilla-lstm`` from an import) matches any hash of the
    same backend, and an unknown ("" or None, from older files) matches anything."""
    if not a or not b:
        return True
    if a == b:
        return True
    return (":" not in a or ":" not in b) and a.split(":")[0] == b.split(":")[0]


def check_speaker_encoder(model_encoder: str | None, data_encoder: str | None, model_what: str,
                          data_what: str) -> None:
    """A model is never fed embeddings from another encoder's space: raise naming both."""
    if not same_speaker_encoder(model_encoder, data_encoder):
        raise ValueError(f"{model_what} was trained on speaker embeddings from {model_encoder!r}, but "
                         f"{data_what} uses {data_encoder!r}; set features.speaker to the model's encoder (and "
                         f"rebuild speaker_embedding), or use a model trained with {data_encoder!r}")


def singer_table(manifest: pd.DataFrame, speaker_encoder: str = "") -> dict[str, dict]:
    """Per singer: the mean speaker embedding and the median voiced f0, for conversion targets. The mean is
    renormalized for unit-norm encoders (resemblyzer) and kept plain for ``mozilla-lstm``, as the anchor does."""
    from svc_model.features.speaker import mean_embedding, unit_norm_encoder

    normalize = unit_norm_encoder(speaker_encoder)
    table = {}
    for singer, rows in manifest.groupby("singer"):
        embedding = mean_embedding(np.stack([np.load(p) for p in rows["speaker"]]), normalize=normalize)
        f0 = np.concatenate([np.load(p)[:, 0] for p in rows["pitch"]])
        voiced = f0[f0 > 0]
        table[str(singer)] = {"embedding": embedding.tolist(),
                              "median_f0": float(np.median(voiced)) if len(voiced) else 0.0,
                              "segments": int(len(rows))}
    return table


def mel_image(mel: np.ndarray) -> np.ndarray:
    """A log-mel as an ``(H, W, 3)`` uint8 image (low frequencies at the bottom) for TensorBoard/MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import cm

    norm = (mel - mel.min()) / max(1e-6, float(mel.max() - mel.min()))
    return (cm.magma(norm[::-1])[:, :, :3] * 255).astype(np.uint8)
