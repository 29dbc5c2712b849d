"""Two-stage VisualRWKV training with DeepSpeed (Section 4.1, Appendix A, Table 6).

Stage 1 (`--stage 1`) trains the projector only: the vision tower and the RWKV LM are frozen. Stage 2 (`--stage 2`) trains
the projector and the LM; the tower stays frozen. Defaults follow Table 6 for VisualRWKV 1.6B: AdamW without weight
decay, cosine decay from 1e-3 to 1e-5 (stage 1, batch 256) or 6e-5 to 1.5e-5 (stage 2, batch 128), no warmup, ZeRO
stage 1. The loss is reduced per sample (Appendix D) unless `--loss-reduction batch`.

Weights come from local paths only: `--lm` an RWKV-6 World .pth, `--vision` an open_clip checkpoint, or `--init` a
VisualRWKV checkpoint (a stage-1 result to start stage 2 from). `--toy` builds a tiny random LM and vision tower and the
embedded toy dataset, so the whole path runs on a CPU in minutes:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/train.py --toy --stage 1 --out runs/toy/stage1

`--precision auto` trains in bf16 on CUDA cards that have it (Ampere and later) and in fp32 elsewhere (the CPU, older
cards); `--precision bf16` forces DeepSpeed's bf16 mode, on the CPU too. The log-decay and the WKV state stay float32. Every `--save-every` steps and at the end, rank 0 writes the model in the official
VisualRWKV-v060 layout (`visualrwkv.pth`) and every rank writes its resumable training state (optimizer, scheduler,
step, data position, RNG) as plain tensors and numbers, readable with `torch.load(weights_only=True)`; `--resume`
continues from it. A non-finite loss, or a micro-batch whose samples were all bad, is skipped on every rank together.
"""
import argparse
import json
import math
import os
import random
import socket
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from visualrwkv.data import LlavaDataset, check_bad_fraction, collate_llava, make_toy_llava
from visualrwkv.model import VisualRWKV, load_visualrwkv, next_token_loss, save_visualrwkv
from visualrwkv.prompts import IGNORE_INDEX
from visualrwkv.rwkv import RWKV6Config, load_rwkv6, pick_dtype, randomize_, read_state_dict
from visualrwkv.wkv import IMPLS
from visualrwkv.vision import (CLIPVisionTower, VisionConfig, build_projector, hf_clip_vision_to_open_clip, load_checked,
                               load_open_clip_vision, vision_config_from_state_dict)

TOY_LM = dict(vocab_size=65536, n_layer=4, n_embd=64, head_size=16, lora_mix=8, lora_decay=8)
TOY_VISION = VisionConfig(image_size=32, patch_size=8, width=48, layers=2, head_width=16)
STAGE_DEFAULTS = {1: dict(lr=1e-3, lr_end=1e-5, batch_size=256), 2: dict(lr=6e-5, lr_end=1.5e-5, batch_size=128)}
MODEL_KEYS = ("grid_size", "scan", "image_position", "vision_head_width", "quick_gelu", "text_only_zero_image")
MODEL_DEFAULTS = dict(grid_size=-1, scan="bidirectional", image_position="middle", vision_head_width=64,
                      quick_gelu=True, text_only_zero_image=False)
STATE_FORMAT = "visualrwkv-train-state-v1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--out", required=True, help="output folder: checkpoints, metrics.jsonl, model_config.json")
    w = p.add_argument_group("weights (local paths only)")
    w.add_argument("--toy", action="store_true", help="tiny random LM + tower and the embedded toy data")
    w.add_argument("--lm", help="RWKV-6 World checkpoint (.pth / .safetensors)")
    w.add_argument("--vision", help="open_clip CLIP checkpoint (visual.*), or a VisualRWKV checkpoint's tower (vit.*)")
    w.add_argument("--init", help="VisualRWKV checkpoint to start from (e.g. stage 1's visualrwkv.pth)")
    w.add_argument("--resume", help="a checkpoint folder (out/checkpoints/step-N) or 'auto' for the latest in --out")
    m = p.add_argument_group("model shape (default: --init's model_config.json, else the paper's)")
    m.add_argument("--grid-size", type=int, help="image token pooling, Table 9: -1 all patches, 0 CLS, g g x g")
    m.add_argument("--scan", choices=("unidirectional", "bidirectional", "multidirectional"))
    m.add_argument("--image-position", choices=("first", "middle", "last"))
    m.add_argument("--vision-head-width", type=int)
    m.add_argument("--text-only-zero-image", action="store_true", default=None)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="LLaVA-format .json / .jsonl (with --toy: the stage's toy file by default)")
    d.add_argument("--image-folder", help="folder the records' 'image' paths are relative to (default: the data's)")
    d.add_argument("--toy-samples", type=int, default=512, help="--toy: images in the generated dataset")
    d.add_argument("--ctx-len", type=int, default=2048, help="model positions per sample, image tokens included")
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    d.add_argument("--max-bad-fraction", type=float, default=0.5, help="stop when more samples than this are bad")
    o = p.add_argument_group("optimisation (defaults: Table 6, VisualRWKV 1.6B)")
    o.add_argument("--batch-size", type=int, help="global batch: micro-batch x processes x accumulation")
    o.add_argument("--micro-batch", type=int, default=1, help="samples per process per forward")
    o.add_argument("--lr", type=float, help="initial learning rate (after warmup)")
    o.add_argument("--lr-end", type=float, help="final learning rate of the cosine decay")
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--epochs", type=float, default=None, help="stage 1: 1, stage 2: 2 (Table 6)")
    o.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--zero", type=int, default=1, choices=(0, 1, 2), help="DeepSpeed ZeRO stage")
    o.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA cards with bf16, fp32 elsewhere")
    o.add_argument("--wkv-impl", choices=IMPLS, help="force one WKV implementation (default: by device and length)")
    o.add_argument("--loss-reduction", choices=("sample", "batch"), default="sample", help="Appendix D")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    o.add_argument("--log-every", type=int, default=1)
    args = p.parse_args(argv)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None: setattr(args, key, value)
    if args.epochs is None: args.epochs = 1.0 if args.stage == 1 else 2.0
    if not (args.toy or args.init or args.resume) and not (args.lm and args.vision):
        p.error("give --toy, --init, --resume, or both --lm and --vision")
    if (args.init or args.resume) and (args.lm or args.vision):
        p.error("--lm/--vision build a new model; --init and --resume load a whole VisualRWKV: give one or the other")
    return args


# ---------------------------------------------------------------------------------------------------------- processes
def on_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed():
    """Join the process group torchrun set up (or make a group of one), with DeepSpeed's backend for the device."""
    import deepspeed
    if "RANK" not in os.environ:                                       # plain `python scripts/train.py`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not on_cuda():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce for inference (~80 s of g++); training uses
        # gloo collectives only, so we skip the build. None is the documented "op unavailable" value.
        import deepspeed.comm.torch
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None   # the module, not deepspeed.comm's `torch` name
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or
                                  (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    from deepspeed.accelerator import get_accelerator
    if on_cuda(): torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


def log(rank, *msg):
    if rank == 0: print(*msg, flush=True)


def all_sum(values):
    """Sum a list of numbers over all processes."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl": t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def agree_to_skip(loss, empty: bool):
    """(any process has an empty micro-batch, any has a non-finite loss): the same on every process, so all skip together."""
    nonfinite = not empty and not bool(torch.isfinite(loss.detach()).all())
    any_empty, any_nonfinite = all_sum([float(empty), float(nonfinite)])
    return any_empty > 0, any_nonfinite > 0


# ---------------------------------------------------------------------------------------------------------- model
def model_config(args) -> dict:
    """Model-shape options: command line, else --init's (or --resume's) model_config.json, else the paper's defaults."""
    saved = {}
    sources = [args.resume_dir.parent.parent] if args.resume_dir else []              # <out>/checkpoints/step-N
    if args.init: sources += [Path(args.init).parent, Path(args.init).parent.parent.parent]   # <out>/ or its step-N/
    for source in sources:
        if (source / "model_config.json").is_file():
            saved = json.loads((source / "model_config.json").read_text()); break
    if args.toy and not saved: saved = dict(vision_head_width=TOY_VISION.head_width)
    given = dict(grid_size=args.grid_size, scan=args.scan, image_position=args.image_position,
                 vision_head_width=args.vision_head_width, text_only_zero_image=args.text_only_zero_image)
    return {k: given.get(k) if given.get(k) is not None else saved.get(k, MODEL_DEFAULTS[k]) for k in MODEL_KEYS}


def build_model(args, cfg: dict, init_path=None) -> VisualRWKV:
    """The model to train: from a VisualRWKV checkpoint, from separate LM + tower checkpoints, or tiny and random."""
    shape = dict(grid_size=cfg["grid_size"], scan=cfg["scan"], image_position=cfg["image_position"])
    if init_path is not None:
        return load_visualrwkv(init_path, vision_head_width=cfg["vision_head_width"], quick_gelu=cfg["quick_gelu"],
                               text_only_zero_image=cfg["text_only_zero_image"], **shape).float()
    if args.toy:
        torch.manual_seed(args.seed)                                   # same weights on every process
        model = VisualRWKV(RWKV6Config(**TOY_LM), TOY_VISION, text_only_zero_image=cfg["text_only_zero_image"], **shape)
        randomize_(model.rwkv, seed=args.seed)                         # a random LM whose blocks are not the identity
        return model
    lm = load_rwkv6(args.lm, dtype=torch.float32)
    tower = load_tower(args.vision, cfg["vision_head_width"], cfg["quick_gelu"])
    with torch.device("meta"):
        model = VisualRWKV(lm.cfg, tower.cfg, text_only_zero_image=cfg["text_only_zero_image"], **shape)
    model.rwkv, model.vit = lm, tower
    torch.manual_seed(args.seed)
    model.proj = build_projector(tower.cfg.width, lm.cfg.n_embd)
    return model.float()


def load_tower(path, head_width: int, quick_gelu: bool) -> CLIPVisionTower:
    """The vision tower of an open_clip checkpoint, or the `vit.*` tower of a VisualRWKV checkpoint."""
    sd = read_state_dict(path)
    if not any(k.startswith("vit.vision_model.") for k in sd): return load_open_clip_vision(path, head_width, quick_gelu)
    vit = hf_clip_vision_to_open_clip({k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")})
    tower = CLIPVisionTower(vision_config_from_state_dict(vit, head_width, quick_gelu))
    load_checked(tower.visual, vit, f"{path} (vit.*)")
    return tower


def set_trainable(model: VisualRWKV, stage: int):
    """Stage 1: projector only; stage 2: projector + LM (+ the hybrid's attention). The tower is always frozen."""
    model.requires_grad_(stage == 2)
    model.vit.requires_grad_(False)
    model.proj.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def sample_level_loss(logits, labels):
    """Appendix D: the mean next-token cross-entropy of each sample over its own supervised tokens, then their mean."""
    return next_token_loss(logits, labels, per_sample=True)


def batch_level_loss(logits, labels):
    """Appendix D: the mean over every supervised token of the batch (longer samples weigh more)."""
    return next_token_loss(logits, labels)


# ---------------------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, total: int, lr: float, lr_end: float, warmup: int = 0) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to lr_end at step `total` (Table 6)."""
    if step < warmup: return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * progress))


def train_dtype(args, cuda: bool) -> torch.dtype:
    """The dtype DeepSpeed trains in: --precision, or for `auto` what the device supports (`pick_dtype`)."""
    if args.precision == "auto": return pick_dtype(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]


def ds_config(args, world: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config built from the command line."""
    if args.batch_size % (args.micro_batch * world):
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch} "
                         f"x {world} processes")
    return {"train_batch_size": args.batch_size, "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": args.batch_size // (args.micro_batch * world),
            "gradient_clipping": args.grad_clip, "zero_optimization": {"stage": args.zero},
            "zero_allow_untested_optimizer": True, "bf16": {"enabled": dtype == torch.bfloat16},
            "steps_per_print": 10 ** 9}


# ---------------------------------------------------------------------------------------------------------- data
def epoch_batches(n: int, epoch: int, seed: int, rank: int, world: int, micro_batch: int):
    """This process's micro-batches of sample indices for one epoch: a seeded shuffle, padded so all ranks get as many."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
    order += order[:(-len(order)) % world]
    mine = order[rank::world]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


def make_loader(dataset, batches, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_llava, num_workers=workers)


def toy_data(args, rank):
    """The toy dataset under <out>/../toy_data (made once, by rank 0): the stage's file and its image folder."""
    data_dir = Path(args.out).parent / "toy_data"
    if rank == 0 and not (data_dir / "eval.jsonl").is_file():
        make_toy_llava(data_dir, n_samples=args.toy_samples, seed=args.seed, image_size=64)
    dist.barrier()
    return data_dir / f"stage{args.stage}.json"


# ---------------------------------------------------------------------------------------------------------- state
def optimizer_parts(opt):
    """(kind, inner torch optimizer, fp32 master tensors) of the optimizer DeepSpeed built around our AdamW."""
    if hasattr(opt, "single_partition_of_fp32_groups"):               # ZeRO 1/2: this rank's flat fp32 partition
        return "zero", opt.optimizer, opt.single_partition_of_fp32_groups
    if hasattr(opt, "fp32_groups_flat_partition"):                    # BF16_Optimizer
        return "bf16", opt.optimizer, opt.fp32_groups_flat_partition
    if hasattr(opt, "fp32_groups_flat"):                              # bf16 without ZeRO: FP16_Optimizer in bf16
        return "fp16", opt.optimizer, opt.fp32_groups_flat
    if isinstance(opt, torch.optim.Optimizer): return "torch", opt, []  # fp32 without ZeRO: our AdamW itself
    raise ValueError(f"cannot save the state of DeepSpeed optimizer {type(opt).__name__}: use --zero 1 or 2")


def optimizer_state(engine) -> dict:
    """This rank's optimizer state as plain tensors/numbers: the inner AdamW's state dict and DeepSpeed's fp32 masters."""
    kind, inner, masters = optimizer_parts(engine.optimizer)
    return {"kind": kind, "base": inner.state_dict(), "master": [t.detach().cpu().clone() for t in masters]}


def load_optimizer_state(engine, saved: dict):
    kind, inner, masters = optimizer_parts(engine.optimizer)
    if saved["kind"] != kind or [tuple(t.shape) for t in saved["master"]] != [tuple(t.shape) for t in masters]:
        raise ValueError(f"--resume: the saved optimizer state ({saved['kind']}, master shapes "
                         f"{[tuple(t.shape) for t in saved['master']]}) does not fit this run ({kind}, "
                         f"{[tuple(t.shape) for t in masters]}): use the same --zero and number of processes")
    inner.load_state_dict(saved["base"])
    with torch.no_grad():
        for t, s in zip(masters, saved["master"]): t.copy_(s.to(t.device))


def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(py_state, dtype=torch.int64),
             "python_version": py_version, "python_gauss": py_gauss, "numpy": torch.from_numpy(np_keys.astype(np.int64)),
             "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss)}
    if on_cuda(): state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if on_cuda() and "cuda" in state: torch.cuda.set_rng_state(state["cuda"])


def atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, engine, scheduler, progress: dict, args, rank, world):
    """checkpoints/step-N/: visualrwkv.pth (rank 0, official layout) + train_state-rank{r}.pth; then `latest`."""
    folder = out / "checkpoints" / f"step-{progress['step']:06d}"
    if rank == 0: folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if rank == 0: save_visualrwkv(engine.module, folder / "visualrwkv.pth")
    state = {"format": STATE_FORMAT, "stage": args.stage, "world_size": world, "zero": args.zero, "rank": rank,
             **progress, "optimizer": optimizer_state(engine), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    atomic_torch_save(state, folder / f"train_state-rank{rank}.pth")
    dist.barrier()                                                      # every rank's state is on disk
    if rank == 0:
        tmp = out / "checkpoints" / "latest.tmp"
        tmp.write_text(folder.name)
        os.replace(tmp, out / "checkpoints" / "latest")
    return folder


def resume_folder(args) -> Path:
    if args.resume == "auto":
        latest = Path(args.out) / "checkpoints" / "latest"
        if not latest.is_file(): raise FileNotFoundError(f"--resume auto: no {latest}; nothing saved yet in {args.out}")
        return latest.parent / latest.read_text().strip()
    return Path(args.resume)


def read_train_state(folder: Path, rank: int, world: int, args) -> dict:
    path = folder / f"train_state-rank{rank}.pth"
    if not path.is_file(): raise FileNotFoundError(f"--resume: {path} not found (saved with another number of processes?)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT: raise ValueError(f"{path}: not a {STATE_FORMAT} file")
    for key, now in (("world_size", world), ("zero", args.zero), ("stage", args.stage)):
        if state[key] != now: raise ValueError(f"--resume: {path} was saved with {key}={state[key]}, this run has {now}")
    return state


# ---------------------------------------------------------------------------------------------------------- train
def main(argv=None):
    args = parse_args(argv)
    rank, world = init_distributed()
    import deepspeed
    cuda = on_cuda()
    out = Path(args.out)
    if rank == 0: out.mkdir(parents=True, exist_ok=True)
    args.resume_dir = resume_folder(args) if args.resume else None
    cfg = model_config(args)
    init_path = args.resume_dir / "visualrwkv.pth" if args.resume_dir else args.init
    model = build_model(args, cfg, init_path)
    if args.wkv_impl: model.rwkv.cfg.wkv_impl = args.wkv_impl
    dtype = train_dtype(args, cuda)
    trainable = set_trainable(model, args.stage)
    if rank == 0: (out / "model_config.json").write_text(json.dumps(cfg, indent=1))

    data_path = Path(args.data) if args.data else toy_data(args, rank) if args.toy else None
    if data_path is None: raise ValueError("--data is required without --toy")
    text_only_tokens = model.n_image_tokens if cfg["text_only_zero_image"] else 0
    make_dataset = lambda: LlavaDataset(data_path, args.image_folder, args.ctx_len, model.n_image_tokens,
                                        cfg["image_position"], model.vit.cfg.image_size, text_only_tokens,
                                        cache_dir=out / "hf_cache", max_bad_fraction=args.max_bad_fraction)
    if rank == 0: dataset = make_dataset()                             # builds the Arrow cache once
    dist.barrier()
    if rank != 0: dataset = make_dataset()

    if len(dataset) == 0: raise ValueError(f"{data_path}: no samples")
    config = ds_config(args, world, dtype)
    gas = config["gradient_accumulation_steps"]
    micro_per_epoch = len(epoch_batches(len(dataset), 0, args.seed, rank, world, args.micro_batch))
    total = args.steps or max(1, math.ceil(args.epochs * micro_per_epoch / gas))
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total, args.lr, args.lr_end, args.warmup_steps) / args.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                           model_parameters=trainable)
    scheduler = engine.lr_scheduler
    optimizer_parts(engine.optimizer)                                  # an optimizer we cannot save fails now, not later
    progress = dict(step=0, micro=0, seen=0, skipped=0, nonfinite=0, empty=0)
    if args.resume_dir:
        state = read_train_state(args.resume_dir, rank, world, args)
        load_optimizer_state(engine, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        progress.update({k: state[k] for k in progress})
        engine.global_steps, engine.global_samples = progress["step"], progress["step"] * args.batch_size
        log(rank, f"resumed from {args.resume_dir} at step {progress['step']} (micro-batch {progress['micro']})")

    n_train = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    log(rank, f"stage {args.stage}: {len(dataset)} samples from {data_path}; {world} processes x micro-batch "
              f"{args.micro_batch} x accumulation {gas} = batch {args.batch_size}; {total} steps; ZeRO {args.zero}; "
              f"{str(dtype).removeprefix('torch.')} on {'CUDA' if cuda else 'the CPU'}; trainable {n_train:,} of {n_total:,} parameters; "
              f"{model.n_image_tokens} image tokens; loss reduced per {args.loss_reduction}")
    loss_fn = sample_level_loss if args.loss_reduction == "sample" else batch_level_loss
    reasons = Counter()
    metrics = open(out / "metrics.jsonl", "a" if args.resume_dir else "w") if rank == 0 else None
    window = dict(loss=0.0, micro=0, tokens=0.0, t0=time.time())
    engine.train()
    while progress["step"] < total:
        epoch, offset = divmod(progress["micro"], micro_per_epoch)
        batches = epoch_batches(len(dataset), epoch, args.seed, rank, world, args.micro_batch)[offset:]
        for batch in make_loader(dataset, batches, args.workers):
            progress["micro"] += 1
            reasons.update(s.reason.split(":")[0] for s in batch.skipped)
            loss = None
            if len(batch):
                out_ = engine(batch.input_ids, batch.images, batch.labels)
                loss = loss_fn(out_.logits, out_.labels)
                if all(im is None for im in batch.images):             # ZeRO-2 reduces every trainable tensor: the
                    loss = loss + 0.0 * sum(p.view(-1)[0] for p in trainable)   # projector must be in the graph
            seen, skipped = all_sum([len(batch) + len(batch.skipped), len(batch.skipped)])
            progress["seen"] += int(seen); progress["skipped"] += int(skipped)
            check_bad_fraction(progress["skipped"], progress["seen"], args.max_bad_fraction, reasons,
                               f"{data_path}", min_seen=min(len(dataset), 64))
            any_empty, any_nonfinite = agree_to_skip(loss, empty=len(batch) == 0)
            if any_empty or any_nonfinite:
                kind = "empty" if any_empty else "nonfinite"
                progress[kind] += 1
                if rank == 0: warnings.warn(f"step {progress['step'] + 1}: micro-batch {progress['micro']} skipped on all "
                                            f"processes ({'a process had no usable sample' if kind == 'empty' else 'non-finite loss'})")
                continue
            before, lr_used = engine.global_steps, scheduler.get_last_lr()[0]
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item(); window["micro"] += 1; window["tokens"] += float(out_.mask.sum())
            if engine.global_steps == before: continue                 # still accumulating
            progress["step"] = engine.global_steps
            loss_sum, n_micro, tokens = all_sum([window["loss"], window["micro"], window["tokens"]])
            elapsed = time.time() - window["t0"]
            row = dict(stage=args.stage, step=progress["step"], loss=loss_sum / max(n_micro, 1),
                       lr=lr_used, tokens_per_s=tokens / max(elapsed, 1e-9),
                       skipped=progress["skipped"], nonfinite=progress["nonfinite"], empty=progress["empty"])
            window = dict(loss=0.0, micro=0, tokens=0.0, t0=time.time())
            if rank == 0:
                metrics.write(json.dumps(row) + "\n"); metrics.flush()
                if progress["step"] % args.log_every == 0 or progress["step"] == total:
                    print(f"step {row['step']:>5}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                          f"tok/s {row['tokens_per_s']:,.0f} | skipped {row['skipped']} | non-finite {row['nonfinite']}",
                          flush=True)
            if args.save_every and progress["step"] % args.save_every == 0 and progress["step"] < total:
                save_checkpoint(out, engine, scheduler, progress, args, rank, world)
            if progress["step"] >= total: break
    folder = save_checkpoint(out, engine, scheduler, progress, args, rank, world)
    if rank == 0:
        save_visualrwkv(engine.module, out / "visualrwkv.pth")
        metrics.close()
        print(f"done: {progress['step']} steps; {progress['skipped']} of {progress['seen']} samples skipped; "
              f"{progress['nonfinite']} non-finite, {progress['empty']} empty micro-batches; "
              f"model {out / 'visualrwkv.pth'}; resumable state {folder}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
