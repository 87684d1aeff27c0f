"""`tuneflow registry list | show | history | rollback | promote --force`: read and move the registry's aliases."""

from __future__ import annotations

import argparse
import json

from tuneflow.errors import InputError

SHOWN_TAGS = ("verdict", "test_macro_f1", "method", "shipped_file", "promotion")


def add_parser(commands) -> None:
    registry = commands.add_parser("registry", help="list versions, show the alias history, roll back, force a promotion")
    actions = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="registered models and their aliases")
    show = actions.add_parser("show", help="a model's versions, or one version's tags")
    show.add_argument("name")
    show.add_argument("version", nargs="?")
    history = actions.add_parser("history", help="every alias move of a model, oldest first")
    history.add_argument("name")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    rollback = actions.add_parser("rollback", help="move @champion back to the previous champion (or --to VERSION)")
    rollback.add_argument("name")
    rollback.add_argument("--to", metavar="VERSION", help="a version that was champion before (default: the previous one)")
    rollback.add_argument("--reason", required=True, help="why (recorded in the history)")
    promote = actions.add_parser("promote", help="move @champion to VERSION whatever its verdict (--force, with a reason)")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="required: this bypasses the evaluation gate")
    promote.add_argument("--reason", required=True, help="why (recorded in the history as a forced promotion)")


def run(args: argparse.Namespace) -> int:
    from tuneflow.registry import Registry, force_promote, rollback

    registry = Registry()
    command = args.registry_command
    if command == "list":
        for name in registry.models():
            aliases = ", ".join(f"@{alias}=v{version}" for alias, version in sorted(registry.aliases(name).items()))
            print(f"{name}  {len(registry.versions(name))} version(s)  {aliases or 'no aliases'}")
    elif command == "show" and args.version:
        show_lineage(registry, registry.get(args.name, args.version))
    elif command == "show":
        aliases = registry.aliases(args.name)
        found = registry.versions(args.name)
        if not found:
            raise InputError(f"{args.name}: no such registered model (see `tuneflow registry list`)")
        for version in found:
            marks = " ".join(f"@{alias}" for alias, number in sorted(aliases.items()) if number == version.version)
            tags = "  ".join(f"{key}={version.tags[key]}" for key in SHOWN_TAGS if key in version.tags)
            print(f"v{version.version:<4} {marks:<24} {tags}")
    elif command == "history":
        if registry.registered(args.name) is None:
            raise InputError(f"{args.name}: no such registered model (see `tuneflow registry list`)")
        for entry in registry.history(args.name):
            print(json.dumps(entry, sort_keys=True) if args.json else format_entry(entry))
    elif command == "rollback":
        print(format_entry(rollback(registry, args.name, args.reason, args.to)))
    elif command == "promote":
        if not args.force:
            raise InputError("registry promote: --force is required (it bypasses the evaluation gate); "
                             "a gated promotion is `tuneflow run` or `tuneflow promote`")
        print(format_entry(force_promote(registry, args.name, args.version, args.reason)))
    return 0


def show_lineage(registry, version) -> None:
    """A version's lineage: its tags (data hash, stage hashes, git commit, method, base-model hash, verdict...), its run
    and the params it was trained with; `tuneflow reproduce NAME VERSION` re-runs them."""
    import yaml

    from tuneflow.registry import run_link

    print(f"{version.name} v{version.version}  {run_link(registry.uri, version.run_id)}")
    for key, value in sorted(version.tags.items()):
        print(f"  {key}: {value}")
    print("  params (resolved, as trained):")
    print("\n".join("    " + line for line in yaml.safe_dump(registry.resolved_params(version), sort_keys=False).splitlines()))


def format_entry(entry: dict) -> str:
    moved = f"v{entry['from_version'] or '-'} → v{entry['to_version'] or '-'}"
    forced = " FORCED" if entry["forced"] else ""
    return f"{entry['time']}  @{entry['alias']:<10} {moved:<12} {entry['action']}{forced}  by {entry['who']}: {entry['reason']}"
