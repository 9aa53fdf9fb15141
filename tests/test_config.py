"""Config loading, overrides, validation messages and hashing."""

import pytest
import yaml

from casalimpia.config import (
    ActorPoolConfig,
    BenchConfig,
    ConfigError,
    DefurnishConfig,
    TrainConfig,
    TuneConfig,
    load_config,
    to_yaml,
)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "in", "output": "out", "inpaint": {"steps": 10}}))
    return path


def test_yaml_values_and_defaults(config_file):
    config = load_config(config_file)
    assert config.inpaint.steps == 10
    assert config.masking.preset == "movable"
    assert config.ray.dtype == "auto"


def test_overrides_are_yaml_scalars(config_file):
    config = load_config(
        config_file,
        ["inpaint.guidance_scale=5", "masking.remove=[curtain, blind]", "write.save_masks=false", "limit=3"],
    )
    assert config.inpaint.guidance_scale == 5.0 and isinstance(config.inpaint.guidance_scale, float)
    assert config.masking.remove == ["curtain", "blind"]
    assert config.write.save_masks is False
    assert config.limit == 3


def test_values_are_taken_verbatim(config_file):
    # A URI from --input must not be YAML-parsed ("yes" would become True).
    config = load_config(config_file, values={"input": "yes", "output": None})
    assert config.input == "yes" and config.output == "out"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inpaint.stepz=3", "inpaint.stepz: unknown key"),
        ("inpaint.steps=many", "inpaint.steps: expected int"),
        ("inpaint.steps=0", "inpaint.steps: must be at least 1"),
        ("inpaint.resolution=100", "inpaint.resolution: must be a multiple of 8"),
        ("masking.remove=[sofa, spaceship]", "masking.remove: unknown ADE20K class names ['spaceship']"),
        ("masking.preset=everything", "masking.preset: must be one of"),
        ("write.format=gif", "write.format: must be one of"),
        ("ray.masking_gpus=-1", "ray.masking_gpus: must be non-negative"),
        ("ray.inpainting_actors={min: 0}", "ray.inpainting_actors.min: must be at least 1"),
        ("ray.inpainting_actors={min: 4, max: 2}", "ray.inpainting_actors.max: must be at least min"),
        ("ray.masking_actors=many", "ray.masking_actors: expected {min: N, max: M or null} or an integer"),
        ("ray.masking_actors={size: 2}", "ray.masking_actors.size: unknown key"),
        ("inpaint=3", "inpaint: expected a mapping"),
        ("output=in", "output: must differ from input"),
        ("output=in/results", "output: must not be inside input"),
        ("output=./x/../in/results/", "output: must not be inside input"),
        ("broken", "expected section.key=value"),
    ],
)
def test_errors_name_the_key(config_file, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(config_file, [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_input_and_file(tmp_path):
    with pytest.raises(ConfigError, match="input: is required"):
        load_config(None, ["output=o"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_structure_cannot_be_removed(config_file):
    with pytest.raises(ConfigError, match=r"masking\.remove: the room's structure is never removed"):
        load_config(config_file, ["masking.remove=[wall]"])


def test_actor_pools_grow_within_min_and_max_and_an_integer_fixes_them(config_file):
    assert load_config(config_file).ray.inpainting_actors == ActorPoolConfig(min=1, max=None)
    grows = load_config(config_file, ["ray.inpainting_actors={min: 2, max: null}", "ray.masking_actors.max=8"])
    assert grows.ray.inpainting_actors == ActorPoolConfig(min=2, max=None)
    assert grows.ray.masking_actors == ActorPoolConfig(min=1, max=8)
    assert load_config(config_file, ["ray.inpainting_actors=3"]).ray.inpainting_actors == ActorPoolConfig(3, 3)
    # The production config grows onto whatever the cluster gives; the benchmark needs fixed pools.
    production = load_config("configs/defurnish.yaml", values={"input": "a", "output": "b"}).ray
    assert production.masking_actors.max is None and production.inpainting_actors.max is None
    with pytest.raises(ConfigError, match=r"ray\.inpainting_actors: the benchmark times a fixed pool"):
        load_config("configs/bench_demo.yaml", ["ray.inpainting_actors={min: 1, max: 2}"], BenchConfig)


def test_hash_tracks_output_affecting_values_only(config_file):
    base = load_config(config_file)
    assert load_config(config_file, ["ray.inpainting_actors=4", "overwrite=true"]).config_hash() == base.config_hash()
    assert load_config(config_file, ["inpaint.seed=1"]).config_hash() != base.config_hash()


def test_resolved_yaml_round_trips(config_file, tmp_path):
    config = load_config(config_file, ["masking.keep=[lamp]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(config))
    assert load_config(saved) == config
    assert isinstance(config, DefurnishConfig)


def test_shipped_configs_load():
    for name in ("demo", "defurnish"):
        config = load_config(f"configs/{name}.yaml", values={"input": "a", "output": "b"})
        assert config.inpaint.steps >= 1


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/etc"])
@pytest.mark.parametrize(
    ("config", "cls"), [("configs/train_demo.yaml", TrainConfig), ("configs/tune_demo.yaml", TuneConfig)]
)
def test_run_names_cannot_climb_out_of_the_storage(name, config, cls):
    """A run or sweep name is a folder under the storage URI: one that leaves it is refused."""
    with pytest.raises(ConfigError, match=r"^name: must be a plain name"):
        load_config(config, [f"name={name}"], cls, {"storage": "s3://bucket/runs"} if cls is TrainConfig else None)
