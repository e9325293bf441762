"""``list --remote`` and ``delete --remote ID`` / ``delete ID`` against the real
private service, with real endpoint daemons."""

from __future__ import annotations

import json
import os
import socket
import uuid

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.endpoint.layout import EndpointDir
from tests.support import configure_endpoint, run_cli


class RemoteEndpointsTests(SynchronousTestCase):
    def setUp(self) -> None:
        from funcx_endpoint.testing.service import shared_service

        self.service = shared_service()
        self.user = f"remote-{uuid.uuid4().hex[:8]}"
        self.env = self.service.client_env(self.service.create_client(self.user))
        # Two machines of one user: two config directories, the same credentials.
        self.here = os.path.abspath(self.mktemp())
        self.there = os.path.abspath(self.mktemp())
        self.configure(self.here, "here")
        self.configure(self.there, "there")

    def configure(self, config_dir: str, name: str, address: str = "") -> None:
        result = configure_endpoint(config_dir, name, self.service, self.env, address)
        self.assertEqual(result.returncode, 0, result.stderr)

    def fx(self, config_dir: str, *args: str, env=None):
        return run_cli(config_dir, *args, env=env or self.env)

    def start(self, config_dir: str, name: str) -> str:
        started = self.fx(config_dir, "start", name)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.addCleanup(self.fx, config_dir, "stop", name)
        endpoint_id = EndpointDir(config_dir, name).endpoint_id()
        assert endpoint_id is not None
        return endpoint_id

    def remote_list(self, config_dir: str, env=None) -> list:
        result = self.fx(config_dir, "list", "--remote", "--json", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def test_list_and_delete_at_the_service(self) -> None:
        there_id = self.start(self.there, "there")
        self.assertEqual(self.fx(self.there, "stop", "there").returncode, 0)
        here_id = self.start(self.here, "here")

        rows = {row["endpoint_id"]: row for row in self.remote_list(self.here)}
        self.assertEqual(set(rows), {here_id, there_id})
        self.assertEqual(rows[here_id]["status"], "online")
        self.assertEqual(rows[here_id]["name"], "here")
        self.assertEqual(rows[here_id]["local_profile"], "here")
        self.assertEqual(rows[here_id]["host"], socket.getfqdn())
        self.assertEqual(rows[there_id]["status"], "offline")  # its final report said so
        self.assertIsNone(rows[there_id]["local_profile"])
        table = self.fx(self.here, "list", "--remote")
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("ENDPOINT ID", table.stdout)
        line = next(x for x in table.stdout.splitlines() if x.startswith(here_id))
        self.assertIn("online", line)
        self.assertIn(socket.getfqdn(), line)
        # The local list is unchanged by the wrapper.
        local = self.fx(self.here, "list")
        self.assertIn("here", local.stdout)
        self.assertNotIn(there_id, local.stdout)

        # Another user sees none of them.
        stranger = self.service.client_env(self.service.create_client())
        self.assertEqual(self.remote_list(self.here, env=stranger), [])
        refused = self.fx(self.here, "delete", "--yes", "--remote", there_id, env=stranger)
        self.assertEqual(refused.returncode, 69)
        self.assertIn("not yours", refused.stderr)

        deleted = self.fx(self.here, "delete", "--yes", "--remote", there_id)
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        self.assertIn(f"Deleted endpoint {there_id}", deleted.stdout)
        self.assertEqual({r["endpoint_id"] for r in self.remote_list(self.here)}, {here_id})
        # The other machine's profile can no longer register under that id.
        again = self.fx(self.there, "start", "there")
        self.assertEqual(again.returncode, 69, again.stdout + again.stderr)
        self.assertIn("deleted", again.stderr)

        # Deleting a local profile's own id at the service says what is left here.
        told = self.fx(self.there, "delete", "--yes", "--remote", there_id)
        self.assertEqual(told.returncode, 0, told.stderr)  # deleted already: 410
        self.assertIn("local profile 'there'", told.stdout)

        # `delete ID`: the local profile registered as ID, stopped and deleted everywhere.
        by_id = self.fx(self.here, "delete", "--yes", here_id)
        self.assertEqual(by_id.returncode, 0, by_id.stderr)
        self.assertIn("local profile 'here'", by_id.stdout)
        self.assertFalse(os.path.exists(EndpointDir(self.here, "here").path))
        self.assertEqual(self.remote_list(self.there), [])

    def test_delete_unknown_id(self) -> None:
        unknown = str(uuid.uuid4())
        result = self.fx(self.here, "delete", "--yes", unknown)
        self.assertEqual(result.returncode, 66)
        self.assertIn(f"delete --remote {unknown}", result.stderr)
        remote = self.fx(self.here, "delete", "--yes", "--remote", unknown)
        self.assertEqual(remote.returncode, 69)
        self.assertIn("not found", remote.stderr)
        bad = self.fx(self.here, "delete", "--yes", "--remote", "not-an-id")
        self.assertEqual(bad.returncode, 65)

    def test_empty_list(self) -> None:
        result = self.fx(self.here, "list", "--remote")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("No endpoints are registered", result.stdout)

    def test_wrong_credentials(self) -> None:
        env = dict(self.env, FUNCX_SDK_CLIENT_SECRET="wrong-secret")
        result = self.fx(self.here, "list", "--remote", env=env)
        self.assertEqual(result.returncode, 77, result.stderr)
        self.assertIn("refused the client credentials", result.stderr)

    def test_unreachable_service(self) -> None:
        self.configure(self.here, "gone", "https://127.0.0.1:9/v2")
        result = self.fx(self.here, "list", "--remote", "--profile", "gone")
        self.assertEqual(result.returncode, 69)
        self.assertIn("cannot reach the funcX service at https://127.0.0.1:9/v2", result.stderr)
        # With two services, the reachable one is still listed.
        both = self.fx(self.here, "list", "--remote")
        self.assertEqual(both.returncode, 69)
        self.assertIn("No endpoints are registered", both.stdout)

    def test_options_go_with_remote(self) -> None:
        result = self.fx(self.here, "list", "--json")
        self.assertEqual(result.returncode, 2)
        self.assertIn("go with --remote", result.stderr)


class WrapperTests(SynchronousTestCase):
    """The wrappers keep the local commands as they are."""

    def test_local_json_option_serves_both(self) -> None:
        import click
        from click.testing import CliRunner

        from funcx_endpoint.cli.context import Context
        from funcx_endpoint.cli.remote_endpoints import with_remote_list

        seen = []

        @click.command(name="list")
        @click.option("--json", "as_json", is_flag=True)
        def local(as_json: bool) -> None:
            seen.append(as_json)

        wrapped = with_remote_list(local)
        self.assertEqual([p.name for p in wrapped.params].count("as_json"), 1)

        @click.group()
        @click.pass_context
        def group(ctx: click.Context) -> None:
            ctx.obj = Context(os.path.abspath(self.mktemp()), False)

        group.add_command(wrapped)
        result = CliRunner().invoke(group, ["list", "--json"])
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertEqual(seen, [True])
        # --remote with no profile to say which service: exit 66, before any call.
        remote = CliRunner().invoke(group, ["list", "--remote", "--json"])
        self.assertEqual(remote.exit_code, 66, remote.output)
        self.assertIn("no endpoint profile", remote.output)


REAL_SDK_SCRIPT = """
import json, sys
from funcx import FuncXClient

fxc = FuncXClient(funcx_service_address=sys.argv[1])
out = {"before": sorted(e["endpoint_id"] for e in fxc.get_endpoints())}
fxc.delete_endpoint(sys.argv[2])
out["after"] = sorted(e["endpoint_id"] for e in fxc.get_endpoints())
print(json.dumps(out))
"""


class RealSDKTests(SynchronousTestCase):
    """`list --remote` agrees with the real funcX 1.0.13 SDK's get_endpoints, and
    sees what its delete_endpoint did."""

    def test_list_agrees_with_the_real_sdk(self) -> None:
        import subprocess

        from funcx_endpoint.testing.service import shared_service
        from tests.test_real_funcx_sdk import _funcx_python

        python = _funcx_python()
        service = shared_service()
        env = service.client_env(service.create_client())
        config_dir = os.path.abspath(self.mktemp())
        for name in ("one", "two"):
            configured = configure_endpoint(config_dir, name, service, env)
            self.assertEqual(configured.returncode, 0, configured.stderr)
            started = run_cli(config_dir, "start", name, env=env)
            self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
            self.assertEqual(run_cli(config_dir, "stop", name, env=env).returncode, 0)
        ids = sorted(EndpointDir(config_dir, n).endpoint_id() or "" for n in ("one", "two"))
        listed = run_cli(config_dir, "list", "--remote", "--json", env=env)
        self.assertEqual(sorted(r["endpoint_id"] for r in json.loads(listed.stdout)), ids)

        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        sdk_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FUNCX_", "GLOBUS_")) and k != "PYTHONPATH"
        }
        sdk_env.update(env)
        sdk_env["HOME"] = home
        done = subprocess.run(
            [python, "-c", REAL_SDK_SCRIPT, service.base_url, ids[0]],
            capture_output=True,
            text=True,
            env=sdk_env,
            cwd=home,
            timeout=300,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        out = json.loads(done.stdout.strip().splitlines()[-1])
        self.assertEqual(out["before"], ids)
        self.assertEqual(out["after"], [ids[1]])
        listed = run_cli(config_dir, "list", "--remote", "--json", env=env)
        self.assertEqual([r["endpoint_id"] for r in json.loads(listed.stdout)], [ids[1]])
