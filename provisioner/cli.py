"""``shardchat-provision plan | apply | destroy | status | watch | scale-in``.

Exit codes: 0 done, 1 AWS refused (or holds something in the way, or the state lock is
held), 2 bad config (the key at fault is printed). Everything is checked before the first
call that changes anything. plan, apply, destroy and every watch round hold the cluster's
state lock (``lock.py``) from their first read of the load balancers to their last change;
``scale-in`` and the scale-in part of each watch round hold the scale-in lock instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from botocore.exceptions import BotoCoreError, ClientError

from provisioner import faults, reconcile, scalein, status
from provisioner import lock as lock_mod
from provisioner.actions import Action
from provisioner.plan import ConflictError
from provisioner.reconcile import FleetPlan, checked_desired, destroy_plan_for, plan_for
from provisioner.watch import FAILED, Watcher
from shardchat import config as config_mod
from shardchat.aws.clients import Clients, client, error_code, error_message, make_clients
from shardchat.aws.ec2 import resolve_instances
from shardchat.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    config_errors_exit,
    load_config,
)
from shardchat.cluster.mover import plural

EXIT_AWS = EXIT_FAILED  # AWS refused, or holds something in the way

HINTS = {
    "AccessDenied": "the credentials lack a permission: docs/aws.md lists the IAM policy",
    "AccessDeniedException": "the credentials lack a permission: docs/aws.md lists the policy",
    "TooManyTargetGroups": "the account or ALB holds too many target groups: split clusters",
    "TooManyRules": "the listener holds too many rules: request a rules quota increase",
    "SubnetNotFound": "check aws.subnets (two subnets in two availability zones of aws.vpc_id)",
    "InvalidSubnet": "check aws.subnets (two subnets in two availability zones of aws.vpc_id)",
    "InvalidSecurityGroup": "check aws.security_groups",
    "CertificateNotFound": "check aws.certificate_arn (an ACM certificate in aws.region)",
    "InvalidTarget": "a target is not a running instance of aws.vpc_id (or an IP in it)",
    "DuplicateTargetGroupName": "a target group of that name exists: rename cluster.name",
    "PriorityInUse": "another rule holds that priority: change aws.rule_priority_offset",
}
DEFAULT_HINT = ("steps before the failed one are done and nothing after it ran; fix the cause "
                "and run apply again, it continues from what exists")


class Failure(Exception):
    """Stops the command with an exit code after its message was printed."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _load(path: str, region: str | None) -> config_mod.Config:
    return _with_region(load_config(path), region)


def _with_region(cfg: config_mod.Config, region: str | None) -> config_mod.Config:
    if region:
        cfg = dataclasses.replace(cfg, aws=dataclasses.replace(cfg.aws, region=region))
    return cfg


def _guard(fn: Callable[[], None]) -> None:
    """Run ``fn``, turning errors into a printed sentence and an exit code."""
    try:
        with config_errors_exit():
            fn()
    except Failure as exc:
        sys.exit(exc.code)
    except (ConflictError, lock_mod.LockHeld, lock_mod.LockLost) as exc:
        click.echo(f"Refused ({exc.code}): {exc.message}", err=True)
        sys.exit(EXIT_AWS)
    except ClientError as exc:
        code = error_code(exc)
        click.echo(f"AWS refused ({code}): {error_message(exc)}", err=True)
        click.echo(HINTS.get(code, DEFAULT_HINT), err=True)
        sys.exit(EXIT_AWS)
    except BotoCoreError as exc:
        click.echo(f"AWS call failed: {exc}", err=True)
        click.echo("check the credentials, --region and --endpoint-url", err=True)
        sys.exit(EXIT_AWS)


def _lock(cfg: config_mod.Config, clients: Clients, name: str = lock_mod.STATE
          ) -> lock_mod.Lock:
    return lock_mod.Lock(clients.dynamodb, cfg.aws.lock_table, cfg.cluster.name,
                         cfg.aws.lock_lease, name=name)


@contextmanager
def _locked(cfg: config_mod.Config, clients: Clients, command: str
            ) -> Iterator[lock_mod.Lock]:
    """The state lock for the rest of the command (the table made when absent)."""
    lock_mod.ensure_table(clients.dynamodb, cfg.aws.lock_table)
    with _lock(cfg, clients).held(command) as held:
        yield held


def _cfg_and_clients(ctx_obj: dict[str, Any], path: str
                     ) -> tuple[config_mod.Config, Clients]:
    """The config (instances discovered when configured) with every pure check (values,
    shard tables, quotas) passed before the first AWS call that is not discovery."""
    cfg = resolve_instances(_load(path, ctx_obj["region"]), ctx_obj["endpoint_url"])
    checked_desired(cfg)
    return cfg, make_clients(cfg.aws.region, ctx_obj["endpoint_url"])


def _progress(held: lock_mod.Lock) -> Callable[[int, int, Action], None]:
    def progress(idx: int, total: int, action: Action) -> None:
        held.renew_if_due()  # a long apply keeps its lease
        click.echo(f"[{idx}/{total}] {action.line()}")
    return progress


def _confirm(auto_approve: bool, question: str) -> None:
    if auto_approve:
        return
    if not click.confirm(question, default=False):
        click.echo("Nothing changed.")
        raise Failure(EXIT_OK)


def _execute(plan: FleetPlan, clients: Clients, held: lock_mod.Lock, auto_approve: bool,
             question: str) -> None:
    click.echo(plan.render())
    if plan.empty:
        return
    _confirm(auto_approve, question)
    held.renew()  # the question may have waited longer than the lease
    reconcile.run(plan, clients.elbv2, _progress(held))
    click.echo("Done.")


config_option = click.option("--config", "config_path", required=True,
                             type=click.Path(dir_okay=False), help="shardchat TOML config")


@click.group()
@click.option("--region", default=None, help="AWS region (default: aws.region)")
@click.option("--endpoint-url", default=None, help="AWS endpoint (moto server, LocalStack)")
@click.pass_context
def main(ctx: click.Context, region: str | None, endpoint_url: str | None) -> None:
    """Make an AWS Application Load Balancer route /i<N>/* to instance N."""
    try:
        faults.check()
    except ValueError as exc:  # a misspelt point in a test must fail loudly
        click.echo(str(exc), err=True)
        sys.exit(EXIT_CONFIG)
    ctx.ensure_object(dict)
    ctx.obj.setdefault("region", region)
    ctx.obj.setdefault("endpoint_url", endpoint_url)


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config plus --region/--endpoint-url accepted after the command name too."""
    fn = click.option("--endpoint-url", "endpoint_url", default=None,
                      help="AWS endpoint (moto server, LocalStack)")(fn)
    fn = click.option("--region", default=None, help="AWS region (default: aws.region)")(fn)
    return config_option(fn)


def _obj(ctx: click.Context, region: str | None, endpoint_url: str | None) -> dict[str, Any]:
    return {"region": region or ctx.obj.get("region"),
            "endpoint_url": endpoint_url or ctx.obj.get("endpoint_url")}


@main.command("plan")
@_common
@click.pass_context
def plan_cmd(ctx: click.Context, config_path: str, region: str | None,
             endpoint_url: str | None) -> None:
    """Show what apply would change; change nothing."""
    def run() -> None:
        cfg, clients = _cfg_and_clients(_obj(ctx, region, endpoint_url), config_path)
        with _locked(cfg, clients, "plan"):
            click.echo(plan_for(cfg, clients.elbv2).render())
    _guard(run)


@main.command("apply")
@_common
@click.option("--auto-approve", is_flag=True, help="do not ask before changing anything")
@click.pass_context
def apply_cmd(ctx: click.Context, config_path: str, region: str | None,
              endpoint_url: str | None, auto_approve: bool) -> None:
    """Make the load balancer match the config."""
    def run() -> None:
        cfg, clients = _cfg_and_clients(_obj(ctx, region, endpoint_url), config_path)
        with _locked(cfg, clients, "apply") as held:
            _execute(plan_for(cfg, clients.elbv2), clients, held, auto_approve,
                     "Apply these changes?")
    _guard(run)


@main.command("destroy")
@_common
@click.option("--auto-approve", is_flag=True, help="do not ask before deleting anything")
@click.pass_context
def destroy_cmd(ctx: click.Context, config_path: str, region: str | None,
                endpoint_url: str | None, auto_approve: bool) -> None:
    """Remove what apply made (only resources tagged with this cluster)."""
    def run() -> None:
        obj = _obj(ctx, region, endpoint_url)
        cfg = _load(config_path, obj["region"])
        clients = make_clients(cfg.aws.region, obj["endpoint_url"])
        with _locked(cfg, clients, "destroy") as held:
            _execute(destroy_plan_for(cfg, clients.elbv2), clients, held, auto_approve,
                     "Destroy these resources?")
    _guard(run)


@main.command("status")
@_common
@click.pass_context
def status_cmd(ctx: click.Context, config_path: str, region: str | None,
               endpoint_url: str | None) -> None:
    """Each instance, its target group, its rule and its target health."""
    def run() -> None:
        obj = _obj(ctx, region, endpoint_url)
        cfg = resolve_instances(_load(config_path, obj["region"]), obj["endpoint_url"])
        clients = make_clients(cfg.aws.region, obj["endpoint_url"])
        lock = _lock(cfg, clients)
        last = lock_mod.describe_last(lock.last(), time.time())
        holder = lock.holder()
        if holder is not None:
            last += f"; the lock is held by {holder.describe(time.time())}"
        draining = _lock(cfg, clients, lock_mod.SCALE_IN).holder()
        if draining is not None:
            last += f"; the scale-in lock is held by {draining.describe(time.time())}"
        click.echo(status.render(cfg, reconcile.observe_fleet(cfg, clients.elbv2), last))
    _guard(run)


@main.command("watch")
@_common
@click.option("--interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between two rounds (default: aws.watch_interval).")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None,
              help="Stop after this many rounds (default: run until SIGTERM/SIGINT).")
@click.option("--once", is_flag=True, help="One round, then exit (same as --max-rounds 1).")
@click.pass_context
def watch_cmd(ctx: click.Context, config_path: str, region: str | None,
              endpoint_url: str | None, interval: float | None, max_rounds: int | None,
              once: bool) -> None:
    """Reconcile every shard's ALB with the config (and discovered instances), over and
    over. Exit 0 when the last round succeeded, 1 when it failed."""
    def run() -> None:
        obj = _obj(ctx, region, endpoint_url)
        cfg = _load(config_path, obj["region"])
        clients = make_clients(cfg.aws.region, obj["endpoint_url"])
        lock_mod.ensure_table(clients.dynamodb, cfg.aws.lock_table)

        def leaving(round_cfg: config_mod.Config) -> None:
            try:
                _scale_in(round_cfg, obj["endpoint_url"], clients)
            except lock_mod.LockHeld as exc:  # another watcher drains; this one goes on
                click.echo(f"scale-in skipped this round: {exc.message}")

        watcher = Watcher(
            # re-read every round: an edited file or a new instance counts at once, and a
            # broken edit fails that round (key named) instead of ending the watch
            load=lambda: resolve_instances(_with_region(config_mod.load(config_path),
                                                        obj["region"]), obj["endpoint_url"]),
            elbv2=clients.elbv2, lock=_lock(cfg, clients),
            interval=interval or cfg.aws.watch_interval, max_rounds=1 if once else max_rounds,
            say=lambda line: click.echo(line, err=line.startswith("could not")),
            scale_in=leaving if cfg.aws.autoscaling_groups else None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: watcher.stop.set())
        last = watcher.run()
        if last is not None and last.outcome == FAILED:
            raise Failure(EXIT_AWS)
    _guard(run)


def _scale_in(cfg: config_mod.Config, endpoint_url: str | None, clients: Clients) -> bool:
    """One scale-in round under the scale-in lock (LockHeld when another runs one), each
    leaving instance reported; False when one was kept."""
    autoscaling = client("autoscaling", cfg.aws.region, endpoint_url)
    with _lock(cfg, clients, lock_mod.SCALE_IN).held("scale-in") as held:
        outcomes = asyncio.run(scalein.scale_in_round(autoscaling, cfg, say=click.echo,
                                                      keep=held.renew))
    if not outcomes:
        click.echo("No instance of " + ", ".join(cfg.aws.autoscaling_groups) + " is leaving.")
    for o in outcomes:
        who = f"instance {o.leaving.number}" if o.leaving.number else "an instance"
        verdict = "let go" if o.completed else "kept"
        click.echo(f"{o.leaving.instance_id} ({who} of {o.leaving.group}): {verdict}, "
                   f"{plural(o.rooms_moved, 'room')} moved; {o.note}")
    return all(o.completed for o in outcomes)


@main.command("scale-in")
@_common
@click.pass_context
def scale_in_cmd(ctx: click.Context, config_path: str, region: str | None,
                 endpoint_url: str | None) -> None:
    """Drain the instances a termination lifecycle hook holds, then let them go (one round;
    watch runs one every interval). Exit 1 when one could not be let go yet, or when
    another scale-in holds the scale-in lock."""
    def run() -> None:
        obj = _obj(ctx, region, endpoint_url)
        cfg = resolve_instances(_load(config_path, obj["region"]), obj["endpoint_url"])
        if not cfg.aws.autoscaling_groups:
            click.echo("aws.autoscaling_groups is empty: no group's scale-in is watched.")
            return
        clients = make_clients(cfg.aws.region, obj["endpoint_url"])
        lock_mod.ensure_table(clients.dynamodb, cfg.aws.lock_table)
        if not _scale_in(cfg, obj["endpoint_url"], clients):
            raise Failure(EXIT_FAILED)
    _guard(run)


if __name__ == "__main__":  # pragma: no cover
    main()
