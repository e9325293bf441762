"""Packaging for funcx-endpoint: a funcX endpoint, its private web service and SDK."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
version_ns: dict = {}
with open(os.path.join(HERE, "funcx_endpoint", "version.py")) as f:
    exec(f.read(), version_ns)

with open(os.path.join(HERE, "README.md")) as f:
    long_description = f.read()

setup(
    name="funcx-endpoint",
    version=version_ns["__version__"],
    description=(
        "A funcX endpoint built on Twisted, with a private funcX web service and SDK"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # "twisted.plugins" is listed so our ServiceMakers land in
    # site-packages/twisted/plugins; there is no __init__.py there on purpose.
    # package_dir spells out the default ("packages live in the project root")
    # so that `pip install -e .` puts the project root on sys.path (a static
    # .pth file) instead of an import hook that maps only our packages: twistd's
    # plugin scan looks for twisted/plugins/ directories on sys.path, and must
    # find ours in an editable install too.
    package_dir={"": "."},
    packages=find_packages(include=["funcx_endpoint", "funcx_endpoint.*"])
    + ["twisted.plugins"],
    package_data={
        "funcx_endpoint": ["py.typed"],
        "funcx_endpoint.amqp": ["spec/*.xml"],
        "funcx_endpoint.config": ["templates/*"],
        "funcx_endpoint.portal": ["templates/*.html", "static/*"],
    },
    install_requires=[
        "Twisted[tls]>=24.7.0",
        "txAMQP>=0.8.2",
        "treq>=23.11.0",
        "click>=8.1.0",
        "psutil>=5.9.0",
        "cryptography>=41.0.0",
        "service-identity>=23.1.0",
        "pyOpenSSL>=23.2.0",
        "attrs>=23.1.0",
        "dill>=0.3.6",
        "globus-sdk>=3.65,<5",
        "requests>=2.28",
        "jinja2>=3.1",
    ],
    extras_require={
        "test": [
            "pika>=1.3.0",
            "psycopg2-binary>=2.9",
            "hypothesis>=6.80.0",
            "tqdm>=4.60",
            "selenium>=4.15",
        ],
        "progress": [
            "tqdm>=4.60",
        ],
        "postgresql": [
            "psycopg2-binary>=2.9",
        ],
        "lint": [
            "ruff>=0.5.0",
            "mypy>=1.8.0",
            "mypy-zope>=1.0.0",
        ],
        "docs": [
            "sphinx>=7.0.0",
        ],
        # Parsl's providers, launchers, addresses and channels, as funcX 1.0
        # config.py files import them.  From 2023.1.23 (what funcX 1.0.13
        # required) to the last release whose parsl.channels still exports
        # SSHChannel (2024.8.12 dropped it; later ones also dropped the
        # CobaltProvider and the providers' channel= argument).
        "parsl": [
            "parsl>=2023.1.23,<2024.8.12",
        ],
        # The official Kubernetes client: funcX 1.0's KubernetesProvider runs
        # pods through it, and Parsl's KubernetesProvider needs it.  The tests
        # pass with 26.1.0 (early 2023) and 36.0.3; 37 made its models pydantic
        # ones, which refuse the pod spec Parsl's provider (up to 2024.8.5)
        # builds when it has no image pull secret.
        "kubernetes": [
            "kubernetes>=26.1.0,<37",
        ],
    },
    entry_points={
        "console_scripts": [
            "funcx-endpoint = funcx_endpoint.cli.main:main",
            "funcx-manager = funcx_endpoint.manager.main:main",
            "funcx-worker = funcx_endpoint.worker.main:main",
            "funcx-service = funcx_endpoint.webservice.cli:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
