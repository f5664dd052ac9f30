"""The AsyncAPI 3.0 document of an application (issue 20 item 1): built from a bus,
validated against the official AsyncAPI 3.0.0 JSON Schema, printed by ``eventbus
asyncapi APP`` in a real subprocess, served by ``asyncapi_router()`` (JSON and a
server-rendered page with the console's CSP), the page shown in Chromium.

The official schema is tests/data/asyncapi-3.0.0.schema.json: ``schemas/3.0.0-without-$id.json``
of the AsyncAPI Initiative's ``@asyncapi/specs`` 6.11.1 (npm; Apache-2.0, its
LICENSE beside it), unchanged (sha256 in :data:`SCHEMA_SHA256`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import uvicorn
import yaml
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from eventbus import BaseEvent, EventBus, EventBusSettings, registry
from eventbus.console.asyncapi import asyncapi_router
from eventbus.console.views import SECURITY_HEADERS
from eventbus.contracts import check_against
from eventbus.contracts.asyncapi import asyncapi_document
from eventbus.contracts.snapshot import contracts_of, parse_contracts
from eventbus.exceptions import ConfigurationError
from eventbus.fastapi import create_lifespan
from eventbus.registry import make_spec

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "data" / "asyncapi-3.0.0.schema.json"
SCHEMA_SHA256 = "abe96881dbfaad495ccbb6bd8d3fb43ca18a13b9d7564849ccb66f39d5e5b20f"
SCRIPT = Path(sys.executable).with_name("eventbus")
CHROMIUM = os.environ.get("EVENTBUS_TEST_CHROMIUM", "/usr/bin/chromium")
DOCS_IMG = ROOT / "docs" / "img"
PASSWORD = "s3cret-pass"  # in the Redis URL: must not reach the document


class Address(BaseModel):
    street: str
    city: str = Field(max_length=80, description="City name")


class Customer(BaseModel):
    email: str = Field(max_length=120)
    tier: Literal["gold", "silver"] = "silver"
    address: Address


class ApiOrderPlaced(BaseEvent):
    """A customer placed an order."""

    topic: str = "api.order.placed"
    order_id: int = Field(ge=1)
    customer: Customer
    lines: list[str] = []


class ApiOrderShipped(BaseEvent):
    topic: str = "api.order.shipped"
    __event_version__ = 2
    order_id: int
    carrier: str | None = None


class ApiRefundAsked(BaseEvent):
    topic: str = "api.refund.asked"
    amount_cents: int


async def ship_order(event: ApiOrderPlaced) -> None:
    """Books the parcel."""


def audit_refund(event: BaseEvent) -> None:
    """Writes any refund event to the audit log."""


@pytest.fixture(autouse=True)
def only_this_modules_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``@on_event`` handlers of test modules imported earlier are on every bus; the
    documents here describe the shop's handlers alone."""
    monkeypatch.setattr(registry, "_decorated", [])


def shop_bus(**settings: Any) -> EventBus:
    """Two handlers on two topics in two queues; publishes two classes."""
    bus = EventBus(
        settings=EventBusSettings(**{"backend": "sync", "service": "shop", **settings}),
        publishes=[ApiOrderShipped, ApiRefundAsked],
    )
    bus.registry.add(make_spec(ApiOrderPlaced, ship_order, queue="shipping"))
    bus.registry.add(make_spec("api.refund.asked", audit_refund, queue="audit"))
    return bus


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    raw = SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256
    schema = json.loads(raw)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in validator.iter_errors(document)
    ]


def test_the_document_validates_and_describes_channels_messages_and_operations(
    validator: jsonschema.Draft7Validator,
) -> None:
    document = asyncapi_document(shop_bus())
    assert errors(validator, document) == []
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "shop"
    assert {c["address"] for c in document["channels"].values()} == {
        "api.order.placed",
        "api.order.shipped",
        "api.refund.asked",
    }
    ops = document["operations"]
    receive = {o["x-eventbus-handler"]: o for o in ops.values() if o["action"] == "receive"}
    assert {n.rpartition(".")[2]: (o["x-eventbus-service"], o["x-eventbus-queue"])
            for n, o in receive.items()} == {
        "ship_order": ("shop", "shipping"),
        "audit_refund": ("shop", "audit"),
    }  # fmt: skip
    sent = sorted(
        document["channels"][o["channel"]["$ref"].rpartition("/")[2]]["address"]
        for o in ops.values()
        if o["action"] == "send"
    )
    assert sent == ["api.order.shipped", "api.refund.asked"]
    # every $ref of the document points to something in it
    text = json.dumps(document)
    for ref in {r.split('"')[0] for r in text.split('"$ref": "')[1:]}:
        node: Any = document
        for part in ref[2:].split("/"):
            node = node[part]
    # the handler typed by a class receives that class's message; the untyped one
    # on the refund topic receives the classes known on it
    ship = next(o for n, o in receive.items() if n.endswith("ship_order"))
    [message_ref] = ship["messages"]
    _, _, key = message_ref["$ref"][len("#/channels/") :].partition("/messages/")
    message = document["components"]["messages"][key]
    assert message["name"] == ApiOrderPlaced.__event_type__ == message["x-eventbus-type"]
    assert message["summary"] == "A customer placed an order."
    audit = next(o for n, o in receive.items() if n.endswith("audit_refund"))
    [refund_ref] = audit["messages"]
    assert refund_ref["$ref"].endswith("api.refund.asked_ApiRefundAsked")
    assert audit["description"] == "Writes any refund event to the audit log."


def test_a_message_is_the_envelope_encode_envelope_writes(
    validator: jsonschema.Draft7Validator,
) -> None:
    """The payload schema accepts the bytes the bus puts on the wire, and refuses a
    payload missing a required field of the class."""
    from eventbus.events import encode_envelope

    document = asyncapi_document(shop_bus())
    messages = document["components"]["messages"]
    by_type = {m["x-eventbus-type"]: m for m in messages.values()}
    # the message payload, its $refs resolvable against the whole document
    registry_doc = {**document, "$schema": "http://json-schema.org/draft-07/schema"}

    def payload_validator(event_type: str) -> jsonschema.Draft7Validator:
        wrapper = {**registry_doc, **by_type[event_type]["payload"]}
        return jsonschema.Draft7Validator(wrapper)

    placed = ApiOrderPlaced(
        order_id=7,
        customer=Customer(email="a@example.com", address=Address(street="1 Main", city="Oslo")),
        metadata={"correlation_id": "req-1"},
    )
    wire = json.loads(encode_envelope(placed))
    assert list(payload_validator(placed.event_type).iter_errors(wire)) == []
    del wire["event"]["customer"]["address"]["street"]
    assert list(payload_validator(placed.event_type).iter_errors(wire))
    shipped = ApiOrderShipped(order_id=1)
    wire = json.loads(encode_envelope(shipped))
    assert wire["version"] == 2
    assert list(payload_validator(shipped.event_type).iter_errors(wire)) == []
    assert by_type[shipped.event_type]["payload"]["properties"]["version"] == {
        "const": 2,
        "description": "The version of the event's shape (written when not 1).",
    }
    # the correlation id is located where the bus writes it
    location = by_type[placed.event_type]["correlationId"]["location"]
    assert location == "$message.payload#/event/metadata/correlation_id"
    assert json.loads(encode_envelope(placed))["event"]["metadata"]["correlation_id"] == "req-1"


def test_the_official_schema_rejects_what_is_not_asyncapi_3(
    validator: jsonschema.Draft7Validator,
) -> None:
    """The validation is not vacuous: a wrong action, a missing channel, an
    unknown key are refused by the official schema."""
    document = asyncapi_document(shop_bus())
    key = next(iter(document["operations"]))
    broken = json.loads(json.dumps(document))
    broken["operations"][key]["action"] = "publish"  # AsyncAPI 2 wording
    assert errors(validator, broken)
    broken = json.loads(json.dumps(document))
    del broken["operations"][key]["channel"]
    assert errors(validator, broken)
    broken = json.loads(json.dumps(document))
    broken["servers"] = {"redis": {"url": "redis://x"}}  # 2.x server shape
    assert errors(validator, broken)


def test_nested_models_are_component_schemas_and_another_service_reads_them() -> None:
    document = asyncapi_document(shop_bus())
    schemas = document["components"]["schemas"]
    assert {"Address", "Customer"} <= set(schemas)
    assert schemas["Customer"]["properties"]["address"] == {"$ref": "#/components/schemas/Address"}
    assert "$defs" not in json.dumps(document)
    # eventbus schema check --against reads this document as this service's contracts
    theirs = parse_contracts(json.dumps(document), "shop-asyncapi.json")
    classes = [ApiOrderPlaced, ApiOrderShipped, ApiRefundAsked]
    assert set(theirs) == {c.__event_type__ for c in classes}
    mine = contracts_of({c.__event_type__: c for c in classes})
    assert check_against(mine, theirs, None).ok

    class Changed(BaseEvent):  # the same type name, a field renamed
        __event_type__ = ApiRefundAsked.__event_type__
        _eventbus_unregistered = True
        topic: str = "api.refund.asked"
        amount: int

    result = check_against(contracts_of({Changed.__event_type__: Changed}), theirs, "subscriber")
    assert [b.path for b in result.breaking] == ["amount_cents"]  # the reader requires it


def test_servers_come_from_the_settings_without_secrets(
    validator: jsonschema.Draft7Validator,
) -> None:
    url = f"redis://app:{PASSWORD}@cache.internal:6380/2?socket_timeout=3&password=other"
    redis_doc = asyncapi_document(shop_bus(backend="redis", redis_url=url))
    assert errors(validator, redis_doc) == []
    assert redis_doc["servers"] == {
        "redis": {"host": "cache.internal:6380", "protocol": "redis", "pathname": "/2"}
    }
    text = json.dumps(redis_doc)
    assert PASSWORD not in text and "other" not in text and "app:" not in text
    kafka_doc = asyncapi_document(
        shop_bus(
            backend="kafka",
            kafka_bootstrap_servers="k1:9092,k2:9093",
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="svc",
            kafka_sasl_password=PASSWORD,
        )
    )
    assert errors(validator, kafka_doc) == []
    assert [(s["host"], s["protocol"]) for s in kafka_doc["servers"].values()] == [
        ("k1:9092", "kafka-secure"),
        ("k2:9093", "kafka-secure"),
    ]
    assert PASSWORD not in json.dumps(kafka_doc)
    assert "servers" not in asyncapi_document(shop_bus())  # embedded: in the process


def test_publishes_takes_event_classes_only() -> None:
    with pytest.raises(TypeError, match="BaseEvent subclasses"):
        EventBus(settings=EventBusSettings(backend="sync"), publishes=[ApiOrderShipped(order_id=1)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of event classes"):
        EventBus(settings=EventBusSettings(backend="sync"), publishes=ApiOrderShipped)  # type: ignore[arg-type]

    class NoTopic(BaseEvent):
        _eventbus_unregistered = True
        x: int

    with pytest.raises(ConfigurationError, match="NoTopic in publishes has no default topic"):
        EventBus(settings=EventBusSettings(backend="sync"), publishes=[NoTopic])
    bus = EventBus(
        settings=EventBusSettings(backend="sync"), publishes=[ApiRefundAsked, ApiRefundAsked]
    )
    assert bus.publishes == (ApiRefundAsked,)


APP_MODULE = """
from fastapi import FastAPI
from eventbus import BaseEvent, EventBus, on_event
from eventbus.fastapi import create_lifespan


class CliOrderPlaced(BaseEvent):
    topic: str = "cli.order.placed"
    order_id: int


class CliInvoiceSent(BaseEvent):
    topic: str = "cli.invoice.sent"
    invoice_id: str


@on_event(CliOrderPlaced, queue="billing")
async def bill(event: CliOrderPlaced) -> None: ...


@on_event("cli.invoice.sent", queue="mail")
def mail(event: BaseEvent) -> None: ...


bus = EventBus(publishes=[CliInvoiceSent])
app = FastAPI(title="Billing", version="2.3.0", lifespan=create_lifespan(bus))
"""


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "billing_app.py").write_text(APP_MODULE)
    env = {
        **os.environ,
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:6379/3",
        "EVENTBUS_SERVICE": "billing",
    }
    return subprocess.run(
        [str(SCRIPT), "asyncapi", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prints_the_document_as_json_and_yaml(
    tmp_path: Path, validator: jsonschema.Draft7Validator
) -> None:
    done = run_cli(tmp_path, "billing_app:app")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert errors(validator, document) == []
    assert document["info"]["title"] == "Billing" and document["info"]["version"] == "2.3.0"
    assert document["servers"]["redis"]["host"] == "127.0.0.1:6379"
    assert PASSWORD not in done.stdout
    actions = sorted(
        (o["action"], o.get("x-eventbus-queue", "")) for o in document["operations"].values()
    )
    assert actions == [("receive", "billing"), ("receive", "mail"), ("send", "")]
    assert {o["x-eventbus-service"] for o in document["operations"].values()} == {"billing"}
    # YAML, the same document; the module form (its one EventBus) and -o FILE
    done = run_cli(tmp_path, "billing_app", "--yaml", "-o", "asyncapi.yaml")
    assert done.returncode == 0, done.stderr
    assert "written to asyncapi.yaml" in done.stdout
    from_yaml = yaml.safe_load((tmp_path / "asyncapi.yaml").read_text())
    assert from_yaml["info"]["title"] == "billing"  # the bus alone: the service name
    assert from_yaml["operations"] == document["operations"]
    assert errors(validator, from_yaml) == []


def test_cli_says_what_is_wrong_with_app(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "billing_app:nothing")
    assert done.returncode == 2
    assert done.stderr.startswith("eventbus: ") and "has no attribute 'nothing'" in done.stderr
    done = run_cli(tmp_path, "no_such_module:app")
    assert done.returncode == 2 and "no_such_module" in done.stderr
    assert done.stdout == ""


def test_yaml_without_pyyaml_is_a_clear_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from eventbus import cli

    (tmp_path / "yaml_less_app.py").write_text(
        "from eventbus import EventBus, EventBusSettings\n"
        "bus = EventBus(settings=EventBusSettings(backend='sync'))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    monkeypatch.delenv("EVENTBUS_BACKEND", raising=False)
    assert cli.main(["asyncapi", "yaml_less_app", "--yaml"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err == "eventbus: --yaml needs PyYAML (pip install pyyaml); JSON needs nothing\n"
    )
    assert captured.out == ""
    assert cli.main(["asyncapi", "yaml_less_app"]) == 0
    assert json.loads(capsys.readouterr().out)["asyncapi"] == "3.0.0"


def require_admin(x_admin_token: str = Header()) -> None:
    if x_admin_token != "letmein":
        raise HTTPException(403, "no")


def test_router_refuses_to_mount_without_auth() -> None:
    with pytest.raises(ConfigurationError, match="asyncapi_router\\(\\) needs an auth dependency"):
        asyncapi_router(shop_bus())
    assert asyncapi_router(shop_bus(), allow_unauthenticated=True).routes


def served_app(bus: EventBus) -> FastAPI:
    app = FastAPI(title="Shop API", version="4.1.0", lifespan=create_lifespan(bus))
    app.include_router(asyncapi_router(dependencies=[Depends(require_admin)]))
    return app


def test_router_serves_json_and_a_page_with_the_console_csp(
    validator: jsonschema.Draft7Validator,
) -> None:
    app = served_app(shop_bus())
    with TestClient(app) as client:
        assert client.get("/eventbus/asyncapi.json").status_code == 422  # no token
        headers = {"X-Admin-Token": "letmein"}
        assert client.get("/eventbus/asyncapi", headers={"X-Admin-Token": "x"}).status_code == 403
        answer = client.get("/eventbus/asyncapi.json", headers=headers)
        assert answer.status_code == 200
        document = answer.json()
        assert errors(validator, document) == []
        assert document["info"] == {**document["info"], "title": "Shop API", "version": "4.1.0"}
        page = client.get("/eventbus/asyncapi", headers=headers)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for name, value in SECURITY_HEADERS.items():
            assert page.headers[name] == value
        assert "script-src" not in page.headers["Content-Security-Policy"]
        html = page.text
        assert "<script" not in html and "http://" not in html and "https://" not in html
        for text in ("order_id", "customer", "lines", "street", "city", "amount_cents",
                     "carrier", "api.order.placed", "shipping", "audit", "receive", "send",
                     "maxLength 80", "City name", "ApiOrderPlaced"):  # fmt: skip
            assert text in html, text
        css = client.get("/eventbus/asyncapi.css", headers=headers)
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_the_page_shows_the_servers_without_secrets() -> None:
    url = f"rediss://app:{PASSWORD}@cache.internal:6380/2"
    bus = shop_bus(backend="redis", redis_url=url)
    app = FastAPI()  # no lifespan: the router is given the bus, nothing starts
    app.include_router(asyncapi_router(bus, dependencies=[Depends(require_admin)]))
    page = TestClient(app).get("/eventbus/asyncapi", headers={"X-Admin-Token": "letmein"})
    assert page.status_code == 200
    assert "cache.internal:6380" in page.text and "Redis over TLS." in page.text
    assert PASSWORD not in page.text


def test_the_page_escapes_what_the_classes_say() -> None:
    class Sneaky(BaseEvent):
        """<script>alert(1)</script>"""

        _eventbus_unregistered = True
        topic: str = "api.sneaky"
        note: str = Field(description="<img src=x onerror=alert(1)>")

    bus = shop_bus()
    bus.publishes = (*bus.publishes, Sneaky)
    with TestClient(served_app(bus)) as client:
        html = client.get("/eventbus/asyncapi", headers={"X-Admin-Token": "letmein"}).text
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_the_page_in_chromium_fits_1366_px_and_is_screenshot() -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None  # type: ignore[assignment]
    missing = None if sync_playwright is not None else "playwright is not installed"
    if missing is None and not os.path.exists(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM}"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    from tests.redis_support import free_port, wait_until

    app = FastAPI(title="Shop API", version="4.1.0", lifespan=create_lifespan(shop_bus()))
    app.include_router(asyncapi_router(allow_unauthenticated=True))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 15, "uvicorn")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            problems: list[str] = []
            page.on(
                "response",
                lambda r: (
                    problems.append(f"{r.status} {r.url}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico")
                    else None
                ),
            )
            page.goto(f"http://127.0.0.1:{port}/eventbus/asyncapi")
            assert page.locator("h1").inner_text().startswith("Shop API")
            # the stylesheet loaded under the CSP (the console's header colours apply)
            background = page.evaluate(
                "() => getComputedStyle(document.querySelector('th')).backgroundColor"
            )
            assert background == "rgb(238, 241, 245)"
            width, inner = page.evaluate(
                "() => [document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert width <= inner, f"the page is {width}px wide in a {inner}px window"
            assert problems == []
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            path = DOCS_IMG / "asyncapi.png"
            page.screenshot(path=str(path), full_page=True)
            assert path.stat().st_size > 10_000
            browser.close()
    finally:
        server.should_exit = True
        thread.join(15)
