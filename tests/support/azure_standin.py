#!/usr/bin/env python3
"""A local stand-in for the Azure APIs that hadb's `azure` fence method calls.

It follows the published contract of each API, so that hadb is tested
against the protocol rather than against itself:

* Instance metadata service (plain HTTP, its own port). Every request must
  carry `Metadata: true` (else 400).
    GET /metadata/identity/oauth2/token?api-version=..&resource=..[&client_id=..]
        -> {"access_token", "expires_in": "<seconds as a string>", ...};
           400 invalid_request "Identity not found" without an identity
    GET /metadata/instance/compute?api-version=..
        -> {"subscriptionId", "resourceGroupName", "name", "location", ...}
* Microsoft identity platform (HTTPS, same port as management).
    POST /{tenant}/oauth2/v2.0/token   (form: grant_type=client_credentials,
        client_id, scope=<management>/.default, and client_secret or
        client_assertion_type + client_assertion, an RS256 JWT checked with
        the openssl CLI against the registered certificate)
        -> {"access_token", "expires_in": <seconds>, "token_type": "Bearer"};
           401 invalid_client for a wrong secret or assertion,
           400 unauthorized_client for an unknown client id,
           400 invalid_request for an unknown tenant
* Azure Resource Manager, Microsoft.Compute virtual machines (HTTPS).
  Every request needs `Authorization: Bearer <token issued above>` whose
  audience is this endpoint (else 401) and an api-version (else 400).
    GET  .../virtualMachines/{vm}/instanceView
    GET  .../virtualMachines/{vm}?$expand=instanceView
        -> the VM resource with properties.instanceView (what the Python SDK's
           virtual_machines.get(rg, vm, "instanceView") asks, as
           fence_azure_arm does); without $expand, no instanceView
    GET  /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines
        -> {"value": [VM resources]} (fence_azure_arm's list and monitor)
        -> {"statuses": [{"code": "ProvisioningState/..."},
                         {"code": "PowerState/running|stopping|stopped|..."}]}
    POST .../virtualMachines/{vm}/powerOff[?skipShutdown=true]
    POST .../virtualMachines/{vm}/start
        -> 202 with Azure-AsyncOperation, Location and Retry-After (200 if
           the VM is already in that state); 411 without Content-Length;
           403 AuthorizationFailed for a read-only principal
    GET  /subscriptions/{s}/providers/Microsoft.Compute/locations/{l}/operations/{id}
        -> {"status": "InProgress|Succeeded|Failed", ...}; with
           `monitor=true` (the Location URL): 202 while running, 200 when done
  Unknown subscription, resource group or VM: 404 SubscriptionNotFound,
  ResourceGroupNotFound, ResourceNotFound. With --throttle N the first N
  management requests get 429 TooManyRequests with Retry-After.

A power-off that completes really ends something: per VM, the process whose
pid is in a pid file gets SIGKILL, and/or a shell command runs; a start can
run a command too. So a VM lab can point a VM at its qemu process.

Flags:
  --dir DIR            state directory. Written there: ready.json
                       ({"imds": port, "arm": port, "ca": path}) once both
                       servers listen; log.jsonl, one JSON object per request
                       ({"t": arrival, "server", "method", "path",
                       "status", "principal", "retry_after"}) and per side effect
                       ({"t", "event", "vm", ...}); ca.pem, ca.key,
                       server.pem, server.key: a CA and a server certificate
                       for --host, made with openssl unless already there.
  --host ADDR          address to listen on and to certify (127.0.0.1)
  --imds-port N        metadata service port (0: any free one; the default)
  --arm-port N         login + management HTTPS port (0: any free one)
  --subscription ID    the subscription (00000000-0000-0000-0000-0000000000aa)
  --resource-group RG  the resource group (hadb-rg)
  --location NAME      the region in operation URLs (westeurope)
  --self NAME          the VM the metadata service describes (hadb01)
  --vm SPEC            a VM, repeatable:
                       NAME[,state=running|stopped|deallocated]
                           [,pidfile=PATH][,off-cmd=CMD][,on-cmd=CMD]
                       (commands run with /bin/sh -c, so no commas in them)
  --managed-identity P the principal a metadata token stands for (msi);
                       `none`: this VM has no managed identity
  --identity-client-id ID  the managed identity's client id, if a request
                       names one it must be this (none by default: any)
  --tenant ID          the one tenant (hadb-tenant)
  --sp ID=SECRET       a service principal with a client secret; repeatable
  --sp-cert ID=PEM     a service principal with a certificate; repeatable
  --read-only P        principal P may read but not power off or start
  --op-seconds S       how long a power-off or start runs (2)
  --op-never           operations never end
  --op-forbidden       polling an operation gets 403 (a role scoped to the VM)
  --op-fail            operations end Failed, the VM unchanged
  --view-lag S         after a power-off succeeds, the instance view says
                       `stopping` for S more seconds (0)
  --retry-after S      Retry-After on 202 and running operations (1)
  --location-only      a 202 carries Location but no Azure-AsyncOperation
  --throttle N         429 for the first N management requests (0)
  --throttle-retry-after S  Retry-After on a 429 (2)
  --token-seconds S    lifetime of every token issued (3600)

It stops on SIGTERM or SIGINT.
"""

import argparse
import base64
import datetime
import hashlib
import http.server
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

LOCK = threading.RLock()


def iso(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class World:
    def __init__(self, args):
        self.args = args
        self.log_path = os.path.join(args.dir, "log.jsonl")
        self.vms = {}
        for spec in args.vm:
            parts = spec.split(",")
            vm = {"name": parts[0], "state": "running", "provisioning": "succeeded",
                  "pidfile": None, "off_cmd": None, "on_cmd": None}
            for p in parts[1:]:
                key, _, value = p.partition("=")
                vm[key.replace("-", "_")] = value
            self.vms[vm["name"].lower()] = vm
        self.sps = {}
        for spec in args.sp:
            cid, _, secret = spec.partition("=")
            self.sps[cid] = {"secret": secret}
        for spec in args.sp_cert:
            cid, _, pem = spec.partition("=")
            self.sps[cid] = {"cert": pem}
        self.tokens = {}  # token -> (principal, audience, expires)
        self.ops = {}  # id -> op
        self.throttled = 0

    def record(self, entry, t=None):
        entry = dict(entry, t=time.time() if t is None else t)
        with LOCK:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def issue(self, principal, audience):
        token = "standin." + secrets.token_urlsafe(24)
        with LOCK:
            self.tokens[token] = (principal, audience,
                                  time.time() + self.args.token_seconds)
        return token

    def finish(self, op_id):
        with LOCK:
            op = self.ops[op_id]
            vm = self.vms[op["vm"]]
            if self.args.op_fail:
                op["status"] = "Failed"
                op["error"] = {"code": "InternalExecutionError",
                               "message": "The stand-in was told to fail operations."}
                vm["state"] = op["before"]
            elif op["kind"] == "powerOff":
                self.power_off(vm)
                op["status"] = "Succeeded"
                if self.args.view_lag > 0:
                    t = threading.Timer(self.args.view_lag, self.settle, args=(vm, "stopped"))
                    t.daemon = True
                    t.start()
                else:
                    vm["state"] = "stopped"
            else:
                self.run(vm, "on_cmd")
                vm["state"] = "running"
                op["status"] = "Succeeded"
            vm["provisioning"] = "succeeded"
            op["end"] = time.time()
        self.record({"event": "operation " + op["status"].lower(),
                     "vm": vm["name"], "kind": op["kind"]})

    def settle(self, vm, state):
        with LOCK:
            vm["state"] = state
        self.record({"event": "instance view " + state, "vm": vm["name"]})

    def power_off(self, vm):
        if vm["pidfile"]:
            try:
                with open(vm["pidfile"]) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGKILL)
                self.record({"event": "killed", "vm": vm["name"], "pid": pid})
            except (OSError, ValueError) as e:
                self.record({"event": "kill failed", "vm": vm["name"], "error": str(e)})
        self.run(vm, "off_cmd")

    def run(self, vm, which):
        cmd = vm.get(which)
        if cmd:
            rc = subprocess.call(["/bin/sh", "-c", cmd])
            self.record({"event": which.replace("_", "-"), "vm": vm["name"], "rc": rc})


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "azure-standin"
    world = None  # set per server
    name = ""

    def log_message(self, fmt, *a):
        pass

    def reply(self, status, body=None, headers=None, principal=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        retry_after = None
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
            if k.lower() == "retry-after":
                retry_after = v
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        # Stamped with the request's arrival, so the gap between two
        # entries is a lower bound on how long the client waited.
        self.world.record({"server": self.name, "method": self.command,
                           "path": self.path, "status": status,
                           "principal": principal, "retry_after": retry_after},
                          t=self.arrived)

    def parse_request(self):
        self.arrived = time.time()
        return super().parse_request()

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def base(self):
        return "https://" + self.headers.get("Host", "")


class Imds(Handler):
    name = "imds"

    def do_GET(self):
        a = self.world.args
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if self.headers.get("Metadata") != "true":
            return self.reply(400, {"error": "invalid_request",
                                    "error_description": "Required metadata header not specified"})
        if "api-version" not in q:
            return self.reply(400, {"error": "invalid_request",
                                    "error_description": "Required query variable 'api-version' is missing"})
        if url.path == "/metadata/identity/oauth2/token":
            if a.managed_identity == "none" or (
                    "client_id" in q and a.identity_client_id and q["client_id"] != a.identity_client_id):
                return self.reply(400, {"error": "invalid_request",
                                        "error_description": "Identity not found"})
            resource = q.get("resource")
            if not resource:
                return self.reply(400, {"error": "invalid_request",
                                        "error_description": "Required query variable 'resource' is missing"})
            now = int(time.time())
            token = self.world.issue(a.managed_identity, resource.rstrip("/"))
            return self.reply(200, {
                "access_token": token, "refresh_token": "",
                "expires_in": str(a.token_seconds),
                "expires_on": str(now + a.token_seconds),
                "not_before": str(now), "resource": resource,
                "token_type": "Bearer"}, principal=a.managed_identity)
        if url.path == "/metadata/instance/compute":
            return self.reply(200, {
                "location": a.location, "name": a.self,
                "resourceGroupName": a.resource_group,
                "subscriptionId": a.subscription,
                "vmId": str(uuid.uuid5(uuid.NAMESPACE_DNS, a.self)),
                "osType": "Linux"})
        self.reply(404, {"error": "not_found", "error_description": "No such metadata path"})


class Arm(Handler):
    name = "arm"

    def arm_error(self, status, code, message, principal=None, headers=None):
        self.reply(status, {"error": {"code": code, "message": message}},
                   headers=headers, principal=principal)

    def login(self, tenant):
        a = self.world.args
        form = dict(urllib.parse.parse_qsl(self.body().decode()))

        def refuse(status, error, description):
            self.reply(status, {"error": error, "error_description": description,
                                "error_codes": [0], "timestamp": iso(time.time())})

        if tenant != a.tenant:
            return refuse(400, "invalid_request", f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return refuse(400, "unsupported_grant_type", "Only client_credentials is served here.")
        cid = form.get("client_id", "")
        sp = self.world.sps.get(cid)
        if sp is None:
            return refuse(400, "unauthorized_client", f"Application '{cid}' was not found in the directory.")
        scope = form.get("scope", "")
        if not scope.endswith("/.default"):
            return refuse(400, "invalid_scope", f"The scope '{scope}' is not valid.")
        if "secret" in sp:
            if form.get("client_secret") != sp["secret"]:
                return refuse(401, "invalid_client", "Invalid client secret provided.")
        else:
            problem = self.check_assertion(form, cid, sp["cert"], tenant)
            if problem:
                return refuse(401, "invalid_client", problem)
        token = self.world.issue(cid, scope[: -len("/.default")].rstrip("/"))
        self.reply(200, {"token_type": "Bearer", "expires_in": a.token_seconds,
                         "ext_expires_in": a.token_seconds, "access_token": token},
                   principal=cid)

    def check_assertion(self, form, cid, cert_path, tenant):
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return "client_assertion_type must be jwt-bearer"
        parts = form.get("client_assertion", "").split(".")
        if len(parts) != 3:
            return "The client assertion is not a JWT."
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            sig = b64url_decode(parts[2])
        except ValueError:
            return "The client assertion is not a JWT."
        der = subprocess.run(["openssl", "x509", "-in", cert_path, "-outform", "DER"],
                             capture_output=True, check=True).stdout
        thumb = base64.urlsafe_b64encode(hashlib.sha1(der).digest()).decode().rstrip("=")
        if header.get("alg") != "RS256" or header.get("x5t") != thumb:
            return "The assertion names no registered certificate."
        now = time.time()
        if claims.get("aud") != f"{self.base()}/{tenant}/oauth2/v2.0/token":
            return "The assertion's audience is not this token endpoint."
        if claims.get("iss") != cid or claims.get("sub") != cid:
            return "The assertion's issuer and subject must be the client id."
        if not (claims.get("nbf", 0) - 300 <= now < claims.get("exp", 0)):
            return "The assertion is expired or not yet valid."
        with tempfile.TemporaryDirectory(prefix="hadb-standin-") as d:
            pub = subprocess.run(["openssl", "x509", "-in", cert_path, "-pubkey", "-noout"],
                                 capture_output=True, check=True).stdout
            for name, data in (("pub.pem", pub), ("sig", sig),
                               ("input", (parts[0] + "." + parts[1]).encode())):
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
            ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", os.path.join(d, "pub.pem"),
                                 "-signature", os.path.join(d, "sig"), os.path.join(d, "input")],
                                capture_output=True).returncode == 0
        return None if ok else "The assertion's signature does not verify."

    def authenticate(self):
        """The principal of a valid bearer token, or None once refused."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self.arm_error(401, "AuthenticationFailed",
                           "Authentication failed. The 'Authorization' header is missing.",
                           headers={"WWW-Authenticate": 'Bearer authorization_uri="", error="invalid_token"'})
            return None
        with LOCK:
            found = self.world.tokens.get(auth[len("Bearer "):])
        if found is None:
            self.arm_error(401, "InvalidAuthenticationToken", "The access token is invalid.")
            return None
        principal, audience, expires = found
        if time.time() >= expires:
            self.arm_error(401, "ExpiredAuthenticationToken", "The access token expiry has passed.")
            return None
        if audience != self.base():
            self.arm_error(401, "InvalidAuthenticationTokenAudience",
                           f"The access token has been obtained for wrong audience or resource '{audience}'.")
            return None
        return principal

    def route(self, method):
        a = self.world.args
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        seg = [urllib.parse.unquote(s) for s in url.path.strip("/").split("/")]
        if method == "POST" and len(seg) == 4 and seg[1:] == ["oauth2", "v2.0", "token"]:
            return self.login(seg[0])
        principal = self.authenticate()
        if principal is None:
            return
        if method == "POST" and self.headers.get("Content-Length") is None:
            return self.reply(411, None, principal=principal)
        self.body()
        with LOCK:
            throttle = self.world.throttled < a.throttle
            if throttle:
                self.world.throttled += 1
        if throttle:
            return self.arm_error(429, "TooManyRequests",
                                  "The request is being throttled.",
                                  principal=principal,
                                  headers={"Retry-After": a.throttle_retry_after})
        if "api-version" not in q:
            return self.arm_error(400, "MissingApiVersionParameter",
                                  "The api-version query parameter (?api-version=) is required for all requests.",
                                  principal=principal)
        if len(seg) < 2 or seg[0] != "subscriptions":
            return self.arm_error(404, "NotFound", "No such path.", principal=principal)
        if seg[1] != a.subscription:
            return self.arm_error(404, "SubscriptionNotFound",
                                  f"The subscription '{seg[1]}' could not be found.", principal=principal)
        # /subscriptions/s/providers/Microsoft.Compute/locations/l/operations/id
        if len(seg) == 8 and seg[2] == "providers" and seg[6] == "operations" and method == "GET":
            return self.operation(seg[7], q, principal)
        # /subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines[/vm[/action]]
        if not (len(seg) in (7, 8, 9) and seg[2].lower() == "resourcegroups" and seg[4] == "providers"
                and seg[5].lower() == "microsoft.compute" and seg[6].lower() == "virtualmachines"):
            return self.arm_error(404, "NotFound", "No such path.", principal=principal)
        if seg[3].lower() != a.resource_group.lower():
            return self.arm_error(404, "ResourceGroupNotFound",
                                  f"Resource group '{seg[3]}' could not be found.", principal=principal)
        if len(seg) == 7:
            if method != "GET":
                return self.arm_error(404, "NotFound", "No such path.", principal=principal)
            with LOCK:
                vms = list(self.world.vms.values())
            return self.reply(200, {"value": [self.vm_resource(vm, False) for vm in vms]},
                              principal=principal)
        with LOCK:
            vm = self.world.vms.get(seg[7].lower())
        if vm is None:
            return self.arm_error(404, "ResourceNotFound",
                                  f"The Resource 'Microsoft.Compute/virtualMachines/{seg[7]}' under resource group '{seg[3]}' was not found.",
                                  principal=principal)
        if len(seg) == 8:
            if method != "GET":
                return self.arm_error(404, "NotFound", "No such path.", principal=principal)
            expand = q.get("$expand", "").lower() == "instanceview"
            return self.reply(200, self.vm_resource(vm, expand), principal=principal)
        action = seg[8]
        if method == "GET" and action == "instanceView":
            return self.instance_view(vm, principal)
        if method == "POST" and action in ("powerOff", "start"):
            return self.act(vm, action, q, principal)
        self.arm_error(404, "NotFound", "No such path.", principal=principal)

    def view(self, vm):
        with LOCK:
            state, prov = vm["state"], vm["provisioning"]
        return {
            "computerName": vm["name"], "osName": "ubuntu", "osVersion": "24.04",
            "statuses": [
                {"code": f"ProvisioningState/{prov}", "level": "Info",
                 "displayStatus": f"Provisioning {prov}", "time": iso(time.time())},
                {"code": f"PowerState/{state}", "level": "Info",
                 "displayStatus": f"VM {state}"}]}

    def instance_view(self, vm, principal):
        self.reply(200, self.view(vm), principal=principal)

    def vm_resource(self, vm, expand):
        a = self.world.args
        props = {"vmId": str(uuid.uuid5(uuid.NAMESPACE_URL, vm["name"])),
                 "provisioningState": "Succeeded",
                 "hardwareProfile": {"vmSize": "Standard_D2s_v5"}}
        if expand:
            props["instanceView"] = self.view(vm)
        return {
            "id": f"/subscriptions/{a.subscription}/resourceGroups/{a.resource_group}"
                  f"/providers/Microsoft.Compute/virtualMachines/{vm['name']}",
            "name": vm["name"], "type": "Microsoft.Compute/virtualMachines",
            "location": a.location, "properties": props}

    def act(self, vm, action, q, principal):
        a = self.world.args
        if principal in a.read_only:
            scope = f"/subscriptions/{a.subscription}/resourceGroups/{a.resource_group}/providers/Microsoft.Compute/virtualMachines/{vm['name']}"
            return self.arm_error(
                403, "AuthorizationFailed",
                f"The client '{principal}' with object id '{principal}' does not have authorization to perform action 'Microsoft.Compute/virtualMachines/{action}/action' over scope '{scope}' or the scope is invalid.",
                principal=principal)
        done_state = "stopped" if action == "powerOff" else "running"
        with LOCK:
            already = vm["state"] == done_state or (
                action == "powerOff" and vm["state"] == "deallocated")
            if not already:
                op_id = str(uuid.uuid4())
                self.world.ops[op_id] = {"kind": action, "vm": vm["name"].lower(),
                                         "status": "InProgress", "start": time.time(),
                                         "before": vm["state"], "skip_shutdown": q.get("skipShutdown")}
                vm["state"] = "stopping" if action == "powerOff" else "starting"
                vm["provisioning"] = "updating"
        if already:
            return self.reply(200, None, principal=principal)
        if not a.op_never:
            t = threading.Timer(a.op_seconds, self.world.finish, args=(op_id,))
            t.daemon = True
            t.start()
        op_url = (f"{self.base()}/subscriptions/{a.subscription}/providers/Microsoft.Compute/"
                  f"locations/{a.location}/operations/{op_id}?api-version={q['api-version']}")
        headers = {"Location": op_url + "&monitor=true", "Retry-After": a.retry_after}
        if not a.location_only:
            headers["Azure-AsyncOperation"] = op_url
        self.reply(202, None, principal=principal, headers=headers)

    def operation(self, op_id, q, principal):
        a = self.world.args
        with LOCK:
            op = self.world.ops.get(op_id)
            op = dict(op) if op else None
        if op is None:
            return self.arm_error(404, "NotFound", f"Operation {op_id} not found.", principal=principal)
        if a.op_forbidden:
            # A role scoped to the VM: it may power off, but following the
            # operation needs a read at the location's scope.
            scope = f"/subscriptions/{a.subscription}/providers/Microsoft.Compute/locations/{a.location}/operations/{op_id}"
            return self.arm_error(
                403, "AuthorizationFailed",
                f"The client '{principal}' with object id '{principal}' does not have authorization to perform action 'Microsoft.Compute/locations/operations/read' over scope '{scope}' or the scope is invalid.",
                principal=principal)
        running = op["status"] == "InProgress"
        headers = {"Retry-After": a.retry_after} if running else {}
        if q.get("monitor") == "true":
            if running:
                headers["Location"] = f"{self.base()}{self.path}"
                return self.reply(202, None, headers=headers, principal=principal)
            if op["status"] == "Succeeded":
                return self.reply(200, None, principal=principal)
            return self.reply(500, {"error": op["error"]}, principal=principal)
        body = {"startTime": iso(op["start"]), "status": op["status"], "name": op_id}
        if "end" in op:
            body["endTime"] = iso(op["end"])
        if "error" in op:
            body["error"] = op["error"]
        self.reply(200, body, headers=headers, principal=principal)

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")


def make_certs(d, host):
    """A CA and a server certificate for `host`, made once."""
    ca, key, crt, srv_key = (os.path.join(d, n) for n in ("ca.pem", "ca.key", "server.pem", "server.key"))
    if all(os.path.exists(p) for p in (ca, crt, srv_key)):
        return ca, crt, srv_key
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)
    run("openssl", "req", "-x509", *ec, "-keyout", key, "-out", ca, "-days", "2",
        "-subj", "/CN=hadb azure stand-in CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = os.path.join(d, "server.csr")
    run("openssl", "req", *ec, "-keyout", srv_key, "-out", csr, "-subj", f"/CN={host}")
    ext = os.path.join(d, "server.ext")
    san = f"IP:{host}" if host.replace(".", "").isdigit() or ":" in host else f"DNS:{host}"
    with open(ext, "w") as f:
        f.write(f"subjectAltName={san},DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", key, "-CAcreateserial",
        "-out", crt, "-days", "2", "-extfile", ext)
    return ca, crt, srv_key


def main():
    p = argparse.ArgumentParser(description="Azure API stand-in for hadb's tests (see the module doc).")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--imds-port", type=int, default=0)
    p.add_argument("--arm-port", type=int, default=0)
    p.add_argument("--subscription", default="00000000-0000-0000-0000-0000000000aa")
    p.add_argument("--resource-group", default="hadb-rg")
    p.add_argument("--location", default="westeurope")
    p.add_argument("--self", default="hadb01")
    p.add_argument("--vm", action="append", default=[])
    p.add_argument("--managed-identity", default="msi")
    p.add_argument("--identity-client-id", default=None)
    p.add_argument("--tenant", default="hadb-tenant")
    p.add_argument("--sp", action="append", default=[])
    p.add_argument("--sp-cert", action="append", default=[])
    p.add_argument("--read-only", action="append", default=[])
    p.add_argument("--op-seconds", type=float, default=2.0)
    p.add_argument("--op-never", action="store_true")
    p.add_argument("--op-forbidden", action="store_true")
    p.add_argument("--op-fail", action="store_true")
    p.add_argument("--view-lag", type=float, default=0.0)
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--location-only", action="store_true")
    p.add_argument("--throttle", type=int, default=0)
    p.add_argument("--throttle-retry-after", type=int, default=2)
    p.add_argument("--token-seconds", type=int, default=3600)
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    world = World(args)

    ca, crt, key = make_certs(args.dir, args.host)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)

    imds = http.server.ThreadingHTTPServer((args.host, args.imds_port),
                                           type("I", (Imds,), {"world": world}))
    arm = http.server.ThreadingHTTPServer((args.host, args.arm_port),
                                          type("A", (Arm,), {"world": world}))
    # The handshake happens in each connection's thread, on first read,
    # so a client that never speaks TLS stalls nobody else.
    arm.socket = ctx.wrap_socket(arm.socket, server_side=True, do_handshake_on_connect=False)
    for server in (imds, arm):
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()

    ready = os.path.join(args.dir, "ready.json")
    with open(ready + ".tmp", "w") as f:
        json.dump({"imds": imds.server_address[1], "arm": arm.server_address[1], "ca": ca}, f)
    os.rename(ready + ".tmp", ready)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
