"""`fl-llm provision` and `fl-llm serve`: the commands of a federation of organisations."""

from __future__ import annotations

import textwrap

SERVE_HELP = """\
Run this organisation's platform as a service the federation's coordinator drives over mutual TLS.
CONFIG is a run config (its data.*, model.*, client.device, client.state_dir and ray.* are this
platform's own; training settings come from the coordinator's job) with serve.* (where to listen,
the policy) and federation.bundle (this platform's kit from `fl-llm provision`). The platform's
state between rounds and its privacy ledger stay in client.state_dir (default ./fl_state/<name>).
Stops on SIGTERM or Ctrl-C.

  fl-llm serve platform.yaml federation.bundle=kits/fashion-mall serve.listen=0.0.0.0:7443
"""

PROVISION_HELP = """\
Make a federation CA and a start-up kit per party (coordinator and each platform) from
FEDERATION.yaml — {name, coordinator: {name}, platforms: [{name, address}, ...]} — under OUT:
OUT/<party>/ holds ca.pem, cert.pem, key.pem and federation.yaml; give each party its own
directory (the key never travels elsewhere). OUT/ca/ca.key signs the certificates: keep it offline.
"""


def add_commands(sub) -> None:
    import argparse

    p = sub.add_parser(
        "provision",
        help="make a federation CA and each party's start-up kit (mutual TLS)",
        description=PROVISION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("federation", metavar="FEDERATION.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="where the kits go (must not exist, or be empty)")
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    p.set_defaults(func=cmd_provision)
    p = sub.add_parser(
        "serve",
        help="run this organisation's platform as a service (mutual TLS)",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.set_defaults(func=cmd_serve)


def cmd_provision(ns) -> int:
    from fl_llm.errors import UserError
    from fl_llm.remote.tls import provision

    if ns.days < 1:
        raise UserError("--days must be at least 1")
    for path in provision(ns.federation, ns.out, ns.days):
        print(f"kit: {path}")
    print(
        textwrap.dedent(f"""\
        CA key: {ns.out}/ca/ca.key (keep it offline; every kit holds the CA certificate only)
        each platform: fl-llm serve CONFIG federation.bundle=<its kit>
        coordinator:   fl-llm run CONFIG federation.bundle=<its kit> federation.platforms=[{{name, address}}, ...]""")
    )
    return 0


def cmd_serve(ns) -> int:
    from fl_llm import config as config_mod
    from fl_llm.cli import _split_config_args
    from fl_llm.errors import UserError
    from fl_llm.remote.service import PlatformService
    from fl_llm.remote.tls import load_bundle
    from fl_llm.remote.transport import serve_forever, start_server

    path, overrides = _split_config_args(ns.args)
    own = config_mod.load(path, overrides)
    if not own.federation.bundle:
        raise UserError("fl-llm serve needs federation.bundle: this platform's kit from `fl-llm provision`")
    if own.ray.workers_per_platform > 1:
        raise UserError(
            "fl-llm serve runs this platform as one worker: ray.workers_per_platform must be 1 "
            "(several workers per platform are for fl-llm run)"
        )
    creds = load_bundle(own.federation.bundle)
    fed = creds.federation
    if creds.name not in fed.platform_names:
        raise UserError(
            f"federation.bundle is {creds.name!r}'s kit, which the federation file does not list as a platform"
        )
    index = fed.platform_names.index(creds.name)
    service = PlatformService(own, creds.name, fed.coordinator, index)
    if own.serve.backend == "ray":
        from fl_llm.server.backends import start_ray

        start_ray(own)
    server, port = start_server(service, creds, own.serve.listen)
    host = own.serve.listen.rpartition(":")[0]
    print(
        f"fl_llm serve: platform {creds.name!r} (platform {index} of federation {fed.name!r}) on {host}:{port}, "
        f"mutual TLS; state and privacy ledger in {service.state_dir}",
        flush=True,
    )
    serve_forever(server)
    return 0
