"""``surgeflow erase``: ask for an erasure and wait for its receipt, or search every store."""
from __future__ import annotations

import getpass
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def register(app: typer.Typer, settings_of) -> None:
    @app.command()
    def erase(user: Optional[str] = typer.Option(None, "--user", help="the user id to erase, with "
                                                 "every anonymous id linked to it"),
              anonymous: Optional[str] = typer.Option(None, "--anonymous",
                                                      help="an anonymous id to erase (a visitor)"),
              verify: Optional[str] = typer.Option(None, "--verify", help="search every store "
                                                   "for this id and report what is left"),
              requested_by: Optional[str] = typer.Option(None, help="who asks (for the audit; "
                                                         "default: cli:<login name>)"),
              wait: bool = typer.Option(True, help="wait for the flow's receipt"),
              timeout_s: float = typer.Option(120.0, "--timeout", help="how long to wait"),
              config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                    help="YAML configuration")):
        """Right to erasure: the person leaves Redis, the flow's state, every ClickHouse table,
        dead letters and spools (the running flow does it, within a minute), with an audit."""
        from privacy.erasure import receipt, request_erasure
        from privacy.erasure import verify as search
        from privacy.secrets import redis_url

        settings = settings_of(config)
        url = redis_url(settings.redis)
        if verify is not None:
            found = search(settings, verify, redis_url=url, clickhouse_client=_clickhouse(settings),
                           progress=lambda what: console.print(f"searching {what}...", highlight=False))
            left = {k: v for k, v in found.items() if isinstance(v, int) and v}
            for store, n in sorted(found.items()):
                console.print(f"  {store:34} {n}", highlight=False)
            console.print("[red]found traces of the id[/red]" if left else "nothing left")
            raise typer.Exit(1 if left else 0)
        if (user is None) == (anonymous is None):
            console.print("[red]give one of --user, --anonymous or --verify[/red]")
            raise typer.Exit(2)
        who = requested_by or f"cli:{_login()}"
        try:
            req = request_erasure(settings, user or anonymous, anonymous=anonymous is not None,
                                  requested_by=who, redis_url=url)
        except (ValueError, RuntimeError) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        console.print(f"erasure {req.request_id} queued", highlight=False)
        if not wait:
            return
        deadline = time.monotonic() + timeout_s
        with console.status("waiting for the flow to erase (it must be running)..."):
            while time.monotonic() < deadline:
                doc = receipt(settings, req.request_id, url)
                if doc is not None:
                    removed = doc.get("removed", {})
                    console.print(f"erased: {sum(removed.values())} records removed "
                                  f"({', '.join(f'{k} {v}' for k, v in sorted(removed.items()) if v)})",
                                  highlight=False)
                    return
                time.sleep(0.5)
        console.print("[yellow]no receipt yet: the request stays queued and is carried out when "
                      "the flow runs (the ledger already keeps the id out of any restart)[/yellow]")
        raise typer.Exit(3)


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (containers): still an audit entry
        return "unknown"


def _clickhouse(settings):
    """A client for the search, or None when the embedded ClickHouse is held by a running flow."""
    from connectors.clickhouse import connect
    from privacy.secrets import clickhouse_dsn

    try:
        return connect(clickhouse_dsn(settings.clickhouse))[0]
    except Exception:  # noqa: BLE001 - reported as "not searched"
        return None
