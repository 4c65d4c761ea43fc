"""`stepdistill toy train-teacher | train-flow-teacher | train-evaluator`: rebuild the embedded toy teachers and
evaluator."""

from __future__ import annotations

import argparse
import json

from stepdistill.toy.models import flow_transformer_size
from stepdistill.toy.train import train_evaluator, train_flow_teacher, train_teacher


def cmd_toy_train_teacher(args: argparse.Namespace) -> int:
    info = train_teacher(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                         batch_size=args.batch_size, lr=args.lr, vae_cache=args.vae_cache)
    print(json.dumps(info, indent=2))
    return 0


def cmd_toy_train_flow_teacher(args: argparse.Namespace) -> int:
    info = train_flow_teacher(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              num_latents=args.num_latents, train_text_encoders=args.train_text_encoders,
                              init_from=args.init_from, link_shared=args.link_shared,
                              transformer_overrides=flow_transformer_size(args.width, args.num_layers))
    print(json.dumps(info, indent=2))
    return 0


def cmd_toy_train_evaluator(args: argparse.Namespace) -> int:
    info = train_evaluator(args.out, seed=args.seed, steps=args.steps)
    print(json.dumps(info, indent=2))
    return 0
