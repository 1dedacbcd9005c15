"""Settings: flags > LMSERVE_* environment > YAML file > defaults; seed key names map."""

import pytest

from lmserve.engine.config import SchedulerConfig
from lmserve.server.cli import build_parser
from lmserve.server.settings import ServeSettings, split_settings
from lmserve.settings import field_docs, load_settings


def settings_from(argv, env=None, yaml_text=None, tmp_path=None):
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config")
    if yaml_text is not None:
        path = tmp_path / "serve.yaml"
        path.write_text(yaml_text)
        config = str(path)
    return split_settings(load_settings(ServeSettings, args, config, environ=env or {}))


def test_precedence(tmp_path):
    yaml_text = "model: from-file\nmax_num_seqs: 3\nblock_size: 32\nport: 7000\n"
    env = {"LMSERVE_MAX_NUM_SEQS": "5", "LMSERVE_PORT": "7100", "LMSERVE_HOME": "/not/a/setting"}
    server, engine = settings_from(["--port", "7200"], env, yaml_text, tmp_path)
    assert engine.model.model == "from-file"  # file only
    assert engine.cache.block_size == 32  # file beats default
    assert engine.scheduler.max_num_seqs == 5  # env beats file
    assert server.port == 7200  # flag beats env and file
    assert engine.scheduler.max_num_batched_tokens == SchedulerConfig().max_num_batched_tokens  # default


def test_seed_key_names_map(tmp_path):
    yaml_text = ("model_name: m\nmax_batch_size: 7\ngpu_blocks: 99\nenable_radix_cache: false\n"
                 "kv_cache_memory_bytes: 123456\ntensor_parallel_size: 1\n")
    server, engine = settings_from([], {"LMSERVE_MAX_BATCH_SIZE": "9"}, yaml_text, tmp_path)
    assert engine.model.model == "m" and engine.scheduler.max_num_seqs == 9
    assert engine.cache.num_blocks == 99 and engine.cache.enable_prefix_caching is False
    assert engine.cache.kv_cache_memory == 123456 and server.tensor_parallel_size == 1


@pytest.mark.parametrize(
    "argv, env, yaml_text, message",
    [
        (["m", "--port", "0"], {}, None, "port must be in 1..65535"),
        (["m"], {"LMSERVE_MAX_NUM_SEQS": "lots"}, None, "invalid setting max_num_seqs"),
        (["m", "--tensor-parallel-size", "2"], {}, None, "tensor_parallel_size > 1 is not supported"),
        (["m", "--dtype", "float8"], {}, None, "dtype must be one of"),
        ([], {}, "model: m\nmax_num_seqz: 3\n", "unknown setting 'max_num_seqz'"),
        ([], {}, "- just\n- a list\n", "must hold a mapping"),
        (["m", "--tls-certfile", "c.pem"], {}, None, "must be given together"),
    ],
)
def test_bad_settings_are_one_clear_line(tmp_path, argv, env, yaml_text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        settings_from(argv, env, yaml_text, tmp_path)
    assert "\n" not in str(err.value)


def test_every_setting_has_a_help_line():
    parser_help = build_parser().format_help()
    for name, info in ServeSettings.model_fields.items():
        assert info.description, name
        if name != "model":
            assert "--" + name.replace("_", "-") in parser_help
    assert field_docs(SchedulerConfig)["max_num_seqs"] == "Most sequences running at once."
