"""A private Postfix instance on a loopback port: the relay a production worker talks to.

Each `PostfixRelay` has its own config, queue, data and Maildir directories, its own port,
syslog name and log file, so several can run side by side and none touches the system-wide
instance. smtpd requires STARTTLS (a self-signed certificate the worker trusts through
`SSL_CERT_FILE`), refuses unauthenticated pipelining, and, unless started with
`auth=False`, relays only for a SASL login checked against a sasldb the test can change
while the relay runs. Every mail accepted for the test domain lands in one Maildir.

Use it from a test file with `from tests.postfix import postfix_relay`; the fixture skips
(with the reason) where Postfix, its SASL tools or root are missing, since its master
process must start as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from tests.conftest import free_port

DOMAIN = "relay.example.org"  # example.org: the contract refuses reserved names such as .test
USERNAME = "mailer"
PASSWORD = "correct horse battery staple"  # noqa: S105 - a test login on a private relay

_POSTFIX = "/usr/sbin/postfix"
_SASLPASSWD = "/usr/sbin/saslpasswd2"
_MAIL_OWNER = "postfix"

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def missing_prerequisite() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    for tool in (_POSTFIX, _SASLPASSWD):
        if not Path(tool).exists():
            return f"{tool} not installed (Debian's postfix, sasl2-bin: `make test` installs them as root)"
    if shutil.which("openssl") is None:
        return "openssl not installed (needed for the relay's self-signed certificate)"
    if os.geteuid() != 0:
        return "a Postfix master process must start as root"
    try:
        pwd.getpwnam(_MAIL_OWNER)
    except KeyError:
        return f"no {_MAIL_OWNER!r} user (the postfix package creates it)"
    return None


@dataclass
class PostfixRelay:
    """One private Postfix: `start()`, `stop()`, and what a test reads or changes in it."""

    directory: Path
    auth: bool = True
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    domain: str = DOMAIN
    username: str = USERNAME
    password: str = PASSWORD

    @property
    def config_dir(self) -> Path:
        return self.directory / "etc"

    @property
    def cert_file(self) -> Path:
        """The self-signed certificate, for the client's `SSL_CERT_FILE`."""
        return self.directory / "etc" / "cert.pem"

    @property
    def maildir(self) -> Path:
        return self.directory / "vmail" / "inbox"

    @property
    def log_file(self) -> Path:
        return self.directory / "maillog"

    @property
    def name(self) -> str:
        return f"postfix-{self.port}"

    def worker_env(self, **overrides: str) -> dict[str, str]:
        """`MAILER_*` variables (and `SSL_CERT_FILE`) that point a worker at this relay."""
        env = {
            "MAILER_SMTP_HOST": self.host,
            "MAILER_SMTP_PORT": str(self.port),
            "MAILER_SMTP_SECURITY": "starttls",
            "SSL_CERT_FILE": str(self.cert_file),
        }
        if self.auth:
            env["MAILER_SMTP_USERNAME"] = self.username
            env["MAILER_SMTP_PASSWORD"] = self.password
        env.update(overrides)
        return env

    # --- what a test changes ---------------------------------------------------------------

    def set_password(self, password: str) -> None:
        """Change the login's password in the sasldb; smtpd reads it at every AUTH."""
        db = self.config_dir / "sasldb2"
        subprocess.run(
            [_SASLPASSWD, "-p", "-c", "-f", str(db), "-u", self.domain, self.username],
            input=password.encode(),
            check=True,
            capture_output=True,
        )
        # smtpd checks logins as the mail owner, after it has dropped root.
        owner = pwd.getpwnam(_MAIL_OWNER)
        os.chown(db, 0, owner.pw_gid)
        db.chmod(0o640)

    # --- what a test reads -------------------------------------------------------------------

    def delivered(self) -> list[Path]:
        """The files delivered into the Maildir so far."""
        return sorted(p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*") if p.is_file())

    def messages(self) -> list[EmailMessage]:
        """Each delivered mail parsed as the stdlib's default policy parses it."""
        parser = BytesParser(policy=policy.default)
        return [parser.parsebytes(path.read_bytes()) for path in self.delivered()]

    def deliveries_logged(self) -> int:
        """How many deliveries Postfix's log reports done: each copy it accepted shows here."""
        return self.log().count("status=sent (delivered to maildir)")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def logged(self, text: str, within: float = 10.0) -> bool:
        """Whether `text` reaches the log within `within` seconds: Postfix writes its log
        through postlogd, a moment after the connection it tells of has ended."""
        deadline = time.monotonic() + within
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, within: float = 20.0) -> None:
        """Write the instance, start its master, and return once smtpd greets with 220."""
        self._lay_out()
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stderr.strip()}\n{self.log()[-2000:]}")
        self._wait_for_greeting(within)

    def stop(self, within: float = 20.0) -> None:
        """`postfix stop`, then wait until no process of this instance is left (SIGKILL past the deadline)."""
        self._postfix("stop")
        deadline = time.monotonic() + within
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def processes(self) -> list[int]:
        """Pids of this instance's master and daemons: each carries MAIL_CONFIG=<its config dir>."""
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
        return found

    def _postfix(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_POSTFIX, "-c", str(self.config_dir), command], capture_output=True, text=True, timeout=60
        )

    def _wait_for_greeting(self, within: float) -> None:
        deadline = time.monotonic() + within
        last: object = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as conn:
                    with conn.makefile("rb") as reader:
                        banner = reader.readline()
                    conn.sendall(b"QUIT\r\n")
                if banner.startswith(b"220 "):
                    return
                last = banner
            except OSError as exc:
                last = exc
            time.sleep(0.02)  # nothing to wait on but the port: poll it
        raise RuntimeError(
            f"postfix did not greet on {self.host}:{self.port} ({last!r})\n{self.log()[-2000:]}"
        )

    def _lay_out(self) -> None:
        owner = pwd.getpwnam(_MAIL_OWNER)
        etc = self.config_dir
        (etc / "sasl").mkdir(parents=True)
        (self.directory / "queue").mkdir()  # postfix creates what lies below it, with its owners
        vmail = self.directory / "vmail"
        vmail.mkdir()
        os.chown(vmail, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "2", "-subj", "/CN=localhost",
                "-keyout", str(etc / "key.pem"), "-out", str(self.cert_file),
                "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
                "-addext", "extendedKeyUsage=serverAuth",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        (etc / "key.pem").chmod(0o600)
        (etc / "sasl" / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            "mech_list: PLAIN LOGIN\n"
            f"sasldb_path: {etc / 'sasldb2'}\n"
        )
        if self.auth:
            self.set_password(self.password)
        (etc / "master.cf").write_text(_MASTER_CF.format(listen=f"{self.host}:{self.port}"))
        (etc / "main.cf").write_text(self._main_cf(owner))

    def _main_cf(self, owner: pwd.struct_passwd) -> str:
        d = self.directory
        if self.auth:
            restrictions = "permit_sasl_authenticated, reject"
        else:
            restrictions = "permit_mynetworks, reject_unauth_destination"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": d / "queue",
            "data_directory": d / "data",
            "mail_owner": _MAIL_OWNER,
            "setgid_group": "postdrop",
            # Own log, own name: several instances side by side, none in the system's syslog.
            "syslog_name": self.name,
            "maillog_file": self.log_file,
            "maillog_file_prefixes": d,
            # Loopback only, no DNS: the machine has no network to ask.
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "myhostname": f"mx.{self.domain}",
            "mydomain": self.domain,
            "myorigin": "$myhostname",
            "mydestination": "localhost",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            # Every address at the test domain into one Maildir (the trailing slash).
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": d / "vmail",
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            "virtual_minimum_uid": "1",
            "virtual_mailbox_limit": "0",
            # What a strict relay asks of a client.
            "smtpd_tls_security_level": "encrypt",
            "smtpd_tls_cert_file": self.cert_file,
            "smtpd_tls_key_file": self.config_dir / "key.pem",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_auth_only": "yes",
            "smtpd_forbid_unauth_pipelining": "yes",
            "smtpd_forbid_bare_newline": "yes",
            "smtpd_helo_required": "yes",
            "smtpd_helo_restrictions": "reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname",
            "smtpd_sasl_auth_enable": "yes" if self.auth else "no",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": self.config_dir / "sasl",
            "smtpd_sasl_local_domain": self.domain,
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_relay_restrictions": restrictions,
            "smtpd_recipient_restrictions": restrictions,
        }
        return "".join(f"{key} = {value}\n" for key, value in settings.items())


@pytest.fixture
def postfix_relay() -> Iterator[Callable[..., PostfixRelay]]:
    """Start private Postfix relays for the test: `postfix_relay()` or `postfix_relay(auth=False)`."""
    if reason := missing_prerequisite():
        pytest.skip(f"no private Postfix: {reason}")
    started: list[PostfixRelay] = []
    # Not pytest's tmp_path: the postfix user must reach the sasldb and Maildir by absolute
    # path, and pytest's base directory is root's alone (0700).
    base = Path(tempfile.mkdtemp(prefix="mailer-postfix-"))
    base.chmod(0o755)

    def start(*, auth: bool = True) -> PostfixRelay:
        directory = base / str(len(started))
        directory.mkdir()
        relay = PostfixRelay(directory, auth=auth)
        started.append(relay)
        try:
            relay.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            if os.environ.get("CI"):
                raise  # CI installs Postfix as root: a relay that will not start is a broken test
            pytest.skip(f"private Postfix did not start: {exc}")
        return relay

    try:
        yield start
    finally:
        for relay in started:
            relay.stop()
        shutil.rmtree(base, ignore_errors=True)
