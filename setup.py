"""Maps the three code folders under the one import root ``lorafleet``.

``platform/`` cannot be a top-level package (it would hide the standard library's
``platform``), so every package found below the three folders is installed as
``lorafleet.<folder>.<sub>``; ``[tool.setuptools.package-dir]`` in pyproject.toml tells
setuptools where each root lives. Listing the packages here keeps new subpackages
importable without editing a list by hand.
"""

from setuptools import find_namespace_packages, setup

ROOTS = ("platform", "adapters_store", "services")

packages = []
for root in ROOTS:
    packages.append(f"lorafleet.{root}")
    packages += [f"lorafleet.{root}.{sub}" for sub in find_namespace_packages(where=root)]

setup(packages=packages, package_data={
        "lorafleet.adapters_store": ["*.md"],
        "lorafleet.platform.modeling": ["data/*"],
        "lorafleet.services.api.ui": ["*.html", "*.css", "*.js"],
    },)
