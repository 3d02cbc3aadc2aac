"""``shardchat-provision plan | apply | destroy | status | scale-in``.

Exit codes: 0 done, 1 AWS refused (or holds something in the way), 2 bad config (the key at
fault is printed). Everything is checked before the first call that changes anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import click
from botocore.exceptions import BotoCoreError, ClientError

from provisioner import reconcile, scalein, status
from provisioner.actions import Action, Plan
from provisioner.observed import observe
from provisioner.plan import ConflictError
from provisioner.reconcile import checked_desired, destroy_plan_for, plan_for
from shardchat import config as config_mod
from shardchat.aws.clients import Clients, client, error_code, error_message, make_clients
from shardchat.aws.ec2 import resolve_instances
from shardchat.cli_common import EXIT_FAILED, EXIT_OK, config_errors_exit, load_config
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
    cfg = load_config(path)
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
    except ConflictError as exc:
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


def _plan(ctx_obj: dict[str, Any], path: str) -> tuple[Plan, Any, Clients]:
    """Config -> plan. With discover = "config" every pure check (values, quotas) runs
    before the first AWS call; discovery has to read EC2 first."""
    cfg = resolve_instances(_load(path, ctx_obj["region"]), ctx_obj["endpoint_url"])
    checked_desired(cfg)
    clients = make_clients(cfg.aws.region, ctx_obj["endpoint_url"])
    plan, observed = plan_for(cfg, clients.elbv2)
    return plan, observed, clients


def _progress(idx: int, total: int, action: Action) -> None:
    click.echo(f"[{idx}/{total}] {action.line()}")


def _confirm(auto_approve: bool, question: str) -> None:
    if auto_approve:
        return
    if not click.confirm(question, default=False):
        click.echo("Nothing changed.")
        raise Failure(EXIT_OK)


def _execute(plan: Plan, observed: Any, clients: Clients, auto_approve: bool,
             question: str) -> None:
    click.echo(plan.render())
    if plan.empty:
        return
    _confirm(auto_approve, question)
    reconcile.run(plan, observed, clients.elbv2, _progress)
    click.echo("Done.")


config_option = click.option("--config", "config_path", required=True,
                             type=click.Path(dir_okay=False), help="shardchat TOML config")


@click.group()
@click.option("--region", default=None, help="AWS region (default: aws.region)")
@click.option("--endpoint-url", default=None, help="AWS endpoint (moto server, LocalStack)")
@click.pass_context
def main(ctx: click.Context, region: str | None, endpoint_url: str | None) -> None:
    """Make an AWS Application Load Balancer route /i<N>/* to instance N."""
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
    _guard(lambda: click.echo(_plan(_obj(ctx, region, endpoint_url), config_path)[0]
                              .render()))


@main.command("apply")
@_common
@click.option("--auto-approve", is_flag=True, help="do not ask before changing anything")
@click.pass_context
def apply_cmd(ctx: click.Context, config_path: str, region: str | None,
              endpoint_url: str | None, auto_approve: bool) -> None:
    """Make the load balancer match the config."""
    def run() -> None:
        plan, observed, clients = _plan(_obj(ctx, region, endpoint_url), config_path)
        _execute(plan, observed, clients, auto_approve, "Apply these changes?")
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
        plan, observed = destroy_plan_for(cfg, clients.elbv2)
        _execute(plan, observed, clients, auto_approve, "Destroy these resources?")
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
        observed = observe(clients.elbv2, cfg.cluster.name, cfg.aws.load_balancer)
        click.echo(status.render(cfg, observed))
    _guard(run)


@main.command("scale-in")
@_common
@click.pass_context
def scale_in_cmd(ctx: click.Context, config_path: str, region: str | None,
                 endpoint_url: str | None) -> None:
    """Drain the instances a termination lifecycle hook holds, then let them go (one round;
    watch runs one every interval). Exit 1 when one could not be let go yet."""
    def run() -> None:
        obj = _obj(ctx, region, endpoint_url)
        cfg = resolve_instances(_load(config_path, obj["region"]), obj["endpoint_url"])
        if not cfg.aws.autoscaling_groups:
            click.echo("aws.autoscaling_groups is empty: no group's scale-in is watched.")
            return
        autoscaling = client("autoscaling", cfg.aws.region, obj["endpoint_url"])
        outcomes = asyncio.run(scalein.scale_in_round(autoscaling, cfg, say=click.echo))
        if not outcomes:
            click.echo("No instance of " + ", ".join(cfg.aws.autoscaling_groups)
                       + " is leaving.")
        for o in outcomes:
            who = f"instance {o.leaving.number}" if o.leaving.number else "an instance"
            verdict = "let go" if o.completed else "kept"
            click.echo(f"{o.leaving.instance_id} ({who} of {o.leaving.group}): {verdict}, "
                       f"{plural(o.rooms_moved, 'room')} moved; {o.note}")
        if not all(o.completed for o in outcomes):
            raise Failure(EXIT_FAILED)
    _guard(run)


if __name__ == "__main__":  # pragma: no cover
    main()
