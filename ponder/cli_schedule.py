"""``--schedule`` and its parameters: the flags of every command that runs a TTT model (``serve``,
``inspect``, ``train ttt``), and the ``Schedule`` they describe."""

from __future__ import annotations

import argparse


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--schedule`` and its parameters, for the commands that run a TTT model; defaults are ``Schedule``'s."""
    from ponder.model.gating import SCHEDULES, Schedule

    parser.add_argument("--schedule", default=Schedule.kind, choices=SCHEDULES,
                        help="where λ comes from (default: the learned gate)")
    parser.add_argument("--schedule-value", type=float, default=Schedule.value, help="λ of --schedule fixed")
    parser.add_argument("--schedule-rate", type=float, default=Schedule.rate,
                        help="update rate of random / random_learned, target rate of threshold / learned_budget / "
                             "policy (a server's default; a request may set its own)")
    parser.add_argument("--schedule-steps", type=int, default=Schedule.steps, help="k of UPDATE_k (--schedule update)")
    parser.add_argument("--schedule-threshold", type=float, default=Schedule.initial_threshold,
                        help="starting threshold of --schedule threshold (on the reconstruction loss)")
    parser.add_argument("--schedule-gain", type=float, default=Schedule.gain,
                        help="step of the --schedule threshold controller")


def schedule_from_args(args: argparse.Namespace):
    from ponder.model.gating import Schedule

    return Schedule(args.schedule, value=args.schedule_value, rate=args.schedule_rate, steps=args.schedule_steps,
                    initial_threshold=args.schedule_threshold, gain=args.schedule_gain)
