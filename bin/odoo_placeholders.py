"""Placeholder manifests for Odoo module categories that base's data refers to but no module of
this Odoo declares.

A reduced Odoo source (such as ../shared/odoo's archive, which keeps only the modules this project
needs) lacks e.g. hr_timesheet, whose manifest is what creates the category
`base.module_category_services_timesheets` that base/data/ir_module_module.xml refers to: a new
database then fails at `-i base`. One non-installable manifest per missing category makes Odoo create
it, and nothing else. With a complete Odoo source this writes nothing.

Usage: python odoo_placeholders.py FOLDER   (prints FOLDER when it wrote placeholders)
"""

import ast
import pathlib
import re
import shutil
import sys

import odoo.addons


def category_xmlids(category):
    """The xml ids Odoo's create_categories gives a manifest category and its parents."""
    parts = category.split("/")
    return {
        "module_category_" + "_".join(part.lower() for part in parts[:depth]).replace("&", "and").replace(" ", "_")
        for depth in range(1, len(parts) + 1)
    }


def main(folder):
    folder = pathlib.Path(folder)
    addons = [pathlib.Path(path) for path in odoo.addons.__path__]
    base_data = next(path / "base" / "data" for path in addons if (path / "base").is_dir())
    referred = set(re.findall(r'ref="base\.(module_category_\w+)"', (base_data / "ir_module_module.xml").read_text()))
    defined = set(re.findall(r'id="(module_category_\w+)"', (base_data / "ir_module_category_data.xml").read_text()))
    for addons_path in addons:
        for manifest in addons_path.glob("*/__manifest__.py"):
            defined |= category_xmlids(ast.literal_eval(manifest.read_text()).get("category", "Uncategorized"))
    missing = sorted(referred - defined)
    shutil.rmtree(folder, ignore_errors=True)
    if not missing:
        return
    for xmlid in missing:
        name = "placeholder_" + xmlid.removeprefix("module_category_")
        module = folder / name
        module.mkdir(parents=True)
        # "services_timesheets" -> "Services/Timesheets": Odoo derives the same xml id from it.
        category = "/".join(word.capitalize() for word in xmlid.removeprefix("module_category_").split("_", 1))
        (module / "__init__.py").write_text("")
        (module / "__manifest__.py").write_text(
            repr(
                {
                    "name": f"Placeholder for category {category}",
                    "category": category,
                    "installable": False,
                    "license": "LGPL-3",
                }
            )
            + "\n"
        )
    print(folder)


if __name__ == "__main__":
    main(sys.argv[1])
