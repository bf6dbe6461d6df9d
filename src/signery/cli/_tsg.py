"""``signery tsg ...``: Tenant Security Groups, the access boundaries."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from signery import protocol as p
from signery.cli._common import JsonOpt, connection, details, emit, out, table
from signery.cli._subject_policy import subject_policy_app

tsg_app = typer.Typer(help="Tenant Security Groups: the access boundaries.", no_args_is_help=True)
tsg_app.add_typer(subject_policy_app, name="subject-policy")


def _tsg_rows(tsgs: list[p.Tsg]) -> None:
    table(
        None,
        ["id", "name", "parent", "depth", "created"],
        [(t.id, t.name, t.parent_id, t.depth, t.created_at) for t in tsgs],
    )


@tsg_app.command("create")
def tsg_create(
    ctx: typer.Context,
    name: str,
    parent: Annotated[
        str | None, typer.Option("--parent", help="Parent TSG id (default: your home TSG).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a child TSG."""
    with connection(ctx).admin() as c:
        tsg = c.tsgs.create(p.TsgCreate(name=name, parent_id=parent))
    emit(
        tsg,
        as_json,
        lambda: out.print(f"created TSG [bold]{tsg.id}[/] ({tsg.name}) under {tsg.parent_id}"),
    )


@tsg_app.command("list")
def tsg_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """TSGs you can see."""
    with connection(ctx).admin() as c:
        tsgs = c.tsgs.list()
    emit(tsgs, as_json, lambda: _tsg_rows(tsgs))


@tsg_app.command("show")
def tsg_show(ctx: typer.Context, tsg_id: str, as_json: JsonOpt = False) -> None:
    with connection(ctx).admin() as c:
        tsg = c.tsgs.get(tsg_id)
    emit(tsg, as_json, lambda: details([(k, v) for k, v in tsg.model_dump().items()]))


@tsg_app.command("tree")
def tsg_tree(
    ctx: typer.Context,
    root: Annotated[str | None, typer.Option(help="Show only the subtree of this TSG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The TSG hierarchy you can see."""
    from rich.tree import Tree

    with connection(ctx).admin() as c:
        forest = c.tsgs.tree(root)

    def human() -> None:
        for node in forest:
            tree = Tree(f"[bold]{node.name}[/] {node.id}")
            _grow(tree, node)
            out.print(tree)

    emit(forest, as_json, human)


def _grow(tree: Any, node: p.TsgTree) -> None:
    for child in node.children:
        _grow(tree.add(f"[bold]{child.name}[/] {child.id}"), child)
