"""`prospect options`: every option of a recipe, and every loss with its own, with defaults and meanings."""

from __future__ import annotations

import dataclasses

from prospect.errors import UserError


def loss_options() -> str:
    from prospect.losses import LOSSES

    lines = ["loss (choose with loss.name):"]
    for name, spec in sorted(LOSSES.items()):
        needs = ["reference model" if spec.needs_reference else "no reference", f"{spec.data} data"]
        if spec.reference_point is not None:
            needs.append(spec.reference_point.summary)
        lines.append(f"  {name}: {spec.describe()}")
        lines.append(f"      needs: {', '.join(needs)}")
        for f in dataclasses.fields(spec.params):
            lines.append(f"  loss.{f.name} = {f.default!r}")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def all_options(only: list[str] | None = None) -> str:
    """Every option, or those of the sections `only` ("loss": the losses and theirs)."""
    from prospect.config import SECTIONS, describe_options
    from prospect.options import suggest

    for name in only or []:
        if name not in SECTIONS and name != "loss":
            raise UserError(
                f"prospect options: unknown section '{name}'{suggest(name, [*SECTIONS, 'loss'])}; expected "
                f"{', '.join([*SECTIONS, 'loss'])}"
            )
    parts = [describe_options(only or ())] if not only or set(only) - {"loss"} else []
    return "\n".join(parts + ([loss_options()] if not only or "loss" in only else []))
