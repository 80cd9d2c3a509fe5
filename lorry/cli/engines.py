"""`lorry engines …`: the vLLM servers deployments run on (install tokens)."""

from __future__ import annotations

from typing import Annotated

import typer

from lorry.cli.output import JsonOption, emit, emit_json, note
from lorry.cli.session import run
from lorry.client.calls import UNSET, Unset

engines_app = typer.Typer(no_args_is_help=True, help="vLLM engines.")
ENGINE_COLUMNS = ["id", "name", "url", "baseModel", "maxLoras", "maxLoraRank", "enabled", "source"]
Json = Annotated[bool, JsonOption]


@engines_app.command("list")
def list_engines(as_json: Json = False) -> None:
    emit(run(lambda c: c.list_engines()), as_json=as_json, columns=ENGINE_COLUMNS)


@engines_app.command("add")
def add(
    name: Annotated[str, typer.Argument()],
    url: Annotated[str, typer.Option(help="The engine's private address, e.g. http://10.0.0.5:8000.")],
    base_model: Annotated[str, typer.Option(help="Canonical base model id the engine serves.")],
    served_model_name: Annotated[str | None, typer.Option()] = None,
    adapter_root: Annotated[str | None, typer.Option(help="Where the engine sees the adapter store.")] = None,
    max_loras: Annotated[int | None, typer.Option()] = None,
    max_cpu_loras: Annotated[int | None, typer.Option()] = None,
    max_lora_rank: Annotated[int | None, typer.Option()] = None,
    api_key: Annotated[str | None, typer.Option(help="The engine's --api-key, if any (write-only).")] = None,
    as_json: Json = False,
) -> None:
    engine = run(
        lambda c: c.create_engine(
            name=name,
            url=url,
            base_model=base_model,
            served_model_name=served_model_name,
            adapter_root=adapter_root,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_lora_rank=max_lora_rank,
            api_key=api_key,
        )
    )
    emit(engine, as_json=as_json, columns=ENGINE_COLUMNS)


@engines_app.command("update")
def update(
    engine_id: Annotated[str, typer.Argument()],
    name: Annotated[str | None, typer.Option()] = None,
    url: Annotated[str | None, typer.Option()] = None,
    base_model: Annotated[str | None, typer.Option()] = None,
    served_model_name: Annotated[str | None, typer.Option()] = None,
    adapter_root: Annotated[str | None, typer.Option()] = None,
    max_loras: Annotated[int | None, typer.Option()] = None,
    max_cpu_loras: Annotated[int | None, typer.Option()] = None,
    max_lora_rank: Annotated[int | None, typer.Option()] = None,
    enabled: Annotated[bool | None, typer.Option("--enabled/--disabled")] = None,
    api_key: Annotated[str | None, typer.Option(help="A new engine --api-key (write-only).")] = None,
    no_api_key: Annotated[bool, typer.Option("--no-api-key", help="Remove the engine's api key.")] = False,
    as_json: Json = False,
) -> None:
    """Change an engine; options left out are kept. Static (LORRY_ENGINES) engines are read-only."""
    if api_key is not None and no_api_key:
        raise typer.BadParameter("--api-key and --no-api-key are exclusive")
    key: str | Unset | None = None if no_api_key else (UNSET if api_key is None else api_key)
    engine = run(
        lambda c: c.update_engine(
            engine_id,
            name=name,
            url=url,
            base_model=base_model,
            served_model_name=UNSET if served_model_name is None else served_model_name,
            adapter_root=UNSET if adapter_root is None else adapter_root,
            max_loras=max_loras,
            max_cpu_loras=UNSET if max_cpu_loras is None else max_cpu_loras,
            max_lora_rank=max_lora_rank,
            enabled=enabled,
            api_key=key,
        )
    )
    emit(engine, as_json=as_json, columns=ENGINE_COLUMNS)


@engines_app.command("remove")
def remove(engine_id: Annotated[str, typer.Argument()], as_json: Json = False) -> None:
    run(lambda c: c.delete_engine(engine_id))
    if as_json:
        emit_json({"deleted": engine_id})
    else:
        note(f"removed engine {engine_id}")
