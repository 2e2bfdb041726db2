"""load_settings: environment (and .env) -> Settings, PROTOCOL section 5."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from estate.config import ConfigError, Settings, load_settings

FELT_64 = "0x" + "0" * 61 + "abc"


def load(**env: str) -> Settings:
    return load_settings(env, env_file=None)


def test_every_setting_has_a_default() -> None:
    missing = [f.name for f in attrs.fields(Settings) if f.default is attrs.NOTHING]
    assert missing == []
    assert isinstance(load(), Settings)


def test_defaults_match_the_protocol() -> None:
    settings = load()
    assert settings.hub_name == "estate"
    assert settings.database_url.startswith("sqlite:///")
    assert settings.mqtt_url is None
    assert settings.uplink_mqtt_url is None
    assert settings.central_url is None
    assert settings.starknet_rpc_url is None
    assert settings.starknet_chain == "SN_SEPOLIA"
    assert settings.keepalive_interval == 5.0
    assert settings.offline_after == 10.0


def test_empty_value_counts_as_unset() -> None:
    assert load(HUB_NAME="  ").hub_name == "estate"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("HUB_NAME", "estate-7", "hub_name", "estate-7"),
        ("DATABASE_URL", "postgresql://gw@db/estate", "database_url", "postgresql://gw@db/estate"),
        ("MQTT_URL", "mqtts://broker:8883", "mqtt_url", "mqtts://broker:8883"),
        ("UPLINK_MQTT_URL", "mqtt://cloud:1883", "uplink_mqtt_url", "mqtt://cloud:1883"),
        ("CENTRAL_URL", "https://central.example/", "central_url", "https://central.example"),
        ("CENTRAL_API_KEY", "k3y", "central_api_key", "k3y"),
        ("STARKNET_RPC_URL", "https://rpc.example", "starknet_rpc_url", "https://rpc.example"),
        ("STARKNET_ACCOUNT_ADDRESS", "0xabc", "starknet_account_address", FELT_64),
        ("STARKNET_PRIVATE_KEY", "0xabc", "starknet_private_key", FELT_64),
        ("SCT_CONTRACT_ADDRESS", "0xabc", "sct_contract_address", FELT_64),
        ("STARKNET_CHAIN", "SN_MAIN", "starknet_chain", "SN_MAIN"),
        ("WH_PER_TOKEN", "250.5", "wh_per_token", 250.5),
    ],
)
def test_protocol_variable_sets_its_setting(
    variable: str, value: str, field: str, expected: object
) -> None:
    # the central and the chain need companions (cross-checks): give them, so that each
    # variable is tried alone
    companions = {
        "CENTRAL_API_KEY": "k",
        "STARKNET_ACCOUNT_ADDRESS": "0x1",
        "STARKNET_PRIVATE_KEY": "0x2",
        "SCT_CONTRACT_ADDRESS": "0x3",
    }
    assert getattr(load(**{**companions, variable: value}), field) == expected


def test_backend_url_is_an_alias_of_central_url() -> None:
    assert load(BACKEND_URL="https://old.example", BACKEND_KEY="k").central_url == (
        "https://old.example"
    )


def test_token_accounting_without_its_account_key_and_contract_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load(STARKNET_RPC_URL="https://rpc.example")
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("STARKNET_RPC_URL='https://rpc.example': ") for line in lines)


def test_the_environment_wins_over_the_env_file_for_aliases_too(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CENTRAL_URL=https://file.example\nCENTRAL_API_KEY=k\nMQTT_URL=mqtt://f\n")
    settings = load_settings({"BACKEND_URL": "https://env.example", "MQTT_URL": ""}, env_file)
    assert settings.central_url == "https://env.example"
    assert settings.mqtt_url == "mqtt://f"  # an empty variable counts as unset


def test_a_central_without_its_api_key_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load(CENTRAL_URL="https://central.example")
    assert str(caught.value).startswith("CENTRAL_URL='https://central.example': ")
    assert "CENTRAL_API_KEY" in str(caught.value)


def test_backend_key_is_an_alias_of_central_api_key() -> None:
    assert load(BACKEND_KEY="old-key").central_api_key == "old-key"


def test_protocol_name_wins_over_its_alias() -> None:
    settings = load(
        CENTRAL_URL="https://new.example", BACKEND_URL="https://old.example", CENTRAL_API_KEY="k"
    )
    assert settings.central_url == "https://new.example"


def test_legacy_mqtt_variables_make_an_mqtts_uplink_url() -> None:
    settings = load(
        MQTT_BROKER="cloud.example",
        MQTT_PORT="8884",
        MQTT_USERNAME="hub",
        MQTT_PASSWORD="pw",
    )
    assert settings.uplink_mqtt_url == "mqtts://hub:pw@cloud.example:8884"


def test_legacy_mqtt_broker_alone_uses_the_tls_port() -> None:
    assert load(MQTT_BROKER="cloud.example").uplink_mqtt_url == "mqtts://cloud.example:8883"


def test_legacy_mqtt_password_is_url_quoted() -> None:
    url = load(MQTT_BROKER="h", MQTT_USERNAME="hub", MQTT_PASSWORD="p@ss:w/rd").uplink_mqtt_url
    assert url == "mqtts://hub:p%40ss%3Aw%2Frd@h:8883"


def test_uplink_mqtt_url_wins_over_legacy_variables() -> None:
    settings = load(UPLINK_MQTT_URL="mqtt://new:1883", MQTT_BROKER="old.example")
    assert settings.uplink_mqtt_url == "mqtt://new:1883"


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("HUB_NAME=from-file\nWH_PER_TOKEN=42\n")
    settings = load_settings({}, env_file=env_file)
    assert settings.hub_name == "from-file"
    assert settings.wh_per_token == 42.0


def test_environment_overrides_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("HUB_NAME=from-file\nSTARKNET_CHAIN=SN_MAIN\n")
    settings = load_settings({"HUB_NAME": "from-env"}, env_file=env_file)
    assert settings.hub_name == "from-env"
    assert settings.starknet_chain == "SN_MAIN"


def test_missing_env_file_is_not_an_error(tmp_path: Path) -> None:
    assert load_settings({}, env_file=tmp_path / "absent.env").hub_name == "estate"


def test_wrong_values_give_one_line_each_naming_variable_value_and_expectation() -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            HUB_NAME="a/b",
            DB_BATCH_MAX="0",
            STARKNET_CHAIN="SN_MOON",
            MQTT_URL="http://broker",
            MQTT_TLS_INSECURE="maybe",
        )
    lines = str(caught.value).splitlines()
    assert len(lines) == 5
    by_variable = {line.split("=", 1)[0]: line for line in lines}
    assert set(by_variable) == {
        "HUB_NAME",
        "DB_BATCH_MAX",
        "STARKNET_CHAIN",
        "MQTT_URL",
        "MQTT_TLS_INSECURE",
    }
    assert "'a/b'" in by_variable["HUB_NAME"]
    assert "expected" in by_variable["HUB_NAME"]
    assert "'0'" in by_variable["DB_BATCH_MAX"]
    assert "between 1 and" in by_variable["DB_BATCH_MAX"]
    assert "'SN_MOON'" in by_variable["STARKNET_CHAIN"]
    assert "SN_SEPOLIA" in by_variable["STARKNET_CHAIN"]
    assert "'http://broker'" in by_variable["MQTT_URL"]
    assert "mqtt://" in by_variable["MQTT_URL"]
    assert "true or false" in by_variable["MQTT_TLS_INSECURE"]


def test_wrong_value_given_by_alias_names_the_alias() -> None:
    with pytest.raises(ConfigError) as caught:
        load(BACKEND_URL="not a url")
    assert str(caught.value).startswith("BACKEND_URL='not a url': expected")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WH_PER_TOKEN", "nan"),
        ("WH_PER_TOKEN", "0"),
        ("KEEPALIVE_INTERVAL", "10"),
        ("DATABASE_URL", "mysql://h/db"),
        ("MQTT_URL", "mqtt://broker:99999"),
        ("STARKNET_ACCOUNT_ADDRESS", "0xnothex"),
        ("MQTT_CA_FILE", "/no/such/file.pem"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_wrong_value_is_a_config_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}="):
        load(**{variable: value})


SECRET_ENV = {
    "CENTRAL_API_KEY": "central-secret-1",
    "STARKNET_PRIVATE_KEY": "0x5ec1e7",
    "MQTT_URL": "mqtt://gw:mqtt-secret-2@broker:1883",
    "UPLINK_MQTT_URL": "mqtts://gw:uplink-secret-3@cloud:8883",
    "DATABASE_URL": "postgresql://gw:db-secret-4@db/estate",
}
SECRETS = ("central-secret-1", "5ec1e7", "mqtt-secret-2", "uplink-secret-3", "db-secret-4")


def test_secrets_are_not_in_the_repr() -> None:
    settings = load(**SECRET_ENV)
    assert settings.central_api_key == "central-secret-1"
    assert settings.mqtt_url == SECRET_ENV["MQTT_URL"]
    text = repr(settings)
    for secret in SECRETS:
        assert secret not in text
    assert "gw:***@broker" in text


def test_legacy_mqtt_password_is_not_in_the_repr() -> None:
    settings = load(MQTT_BROKER="cloud", MQTT_USERNAME="gw", MQTT_PASSWORD="legacy-secret")
    assert "legacy-secret" in settings.uplink_mqtt_url
    assert "legacy-secret" not in repr(settings)


def test_secrets_are_not_in_the_error_text() -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            CENTRAL_API_KEY="central-secret-1",
            STARKNET_PRIVATE_KEY="not-a-felt-secret-5",
            MQTT_URL="http://gw:mqtt-secret-2@broker",
            UPLINK_MQTT_URL="mqtts://gw:uplink-secret-3@cloud:notaport",
            DATABASE_URL="mysql://gw:db-secret-4@db/estate",
            HUB_NAME="bad/hub",
        )
    text = str(caught.value)
    assert len(text.splitlines()) == 5
    for secret in (*SECRETS, "not-a-felt-secret-5"):
        assert secret not in text
    assert "STARKNET_PRIVATE_KEY=" in text


def test_unparsable_url_with_password_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load(MQTT_URL="mqtt://gw:pass[word@broker")
    text = str(caught.value)
    assert text.startswith("MQTT_URL=")
    assert "pass[word" not in text


def test_private_key_is_read_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("0xABC\n")
    settings = load(STARKNET_PRIVATE_KEY_FILE=str(key_file))
    assert settings.starknet_private_key == FELT_64
    assert FELT_64 not in repr(settings)


def test_private_key_variable_wins_over_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("0x1\n")
    settings = load(STARKNET_PRIVATE_KEY="0x2", STARKNET_PRIVATE_KEY_FILE=str(key_file))
    assert settings.starknet_private_key == "0x" + "0" * 63 + "2"


def test_bad_private_key_in_file_is_reported_without_the_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-secret-6\n")
    with pytest.raises(ConfigError) as caught:
        load(STARKNET_PRIVATE_KEY_FILE=str(key_file))
    assert "STARKNET_PRIVATE_KEY_FILE" in str(caught.value)
    assert "file-secret-6" not in str(caught.value)


def test_missing_private_key_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^STARKNET_PRIVATE_KEY_FILE="):
        load(STARKNET_PRIVATE_KEY_FILE="/no/such/key")


@pytest.mark.parametrize(
    "raw",
    ["0x4A1", "0X4a1", " 0x04a1 ", "0x" + "0" * 61 + "4a1"],
)
def test_felt_addresses_are_normalised(raw: str) -> None:
    settings = load(STARKNET_ACCOUNT_ADDRESS=raw, SCT_CONTRACT_ADDRESS=raw)
    expected = "0x" + "0" * 61 + "4a1"
    assert settings.starknet_account_address == expected
    assert settings.sct_contract_address == expected


def test_felt_longer_than_64_digits_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^SCT_CONTRACT_ADDRESS="):
        load(SCT_CONTRACT_ADDRESS="0x" + "1" * 65)
