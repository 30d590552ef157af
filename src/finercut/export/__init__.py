"""Export pruned models for serving engines: the DeciLM / Nemotron-NAS layout (vLLM, llama.cpp's converter) and
GGUF (llama.cpp). ``finercut export RUN --format decilm|gguf --output PATH`` calls :func:`export_model`."""

from __future__ import annotations

from pathlib import Path

from finercut.export.source import ExportError, check_llama_family, kept_block_list, load_source, pruned_model_folder

FORMATS = ("decilm", "gguf")


def export_model(path: str | Path, *, format: str, output: str | Path, overwrite: bool = False,
                 outtype: str = "f32") -> tuple[Path, list[str]]:
    """Export the pruned model in ``path`` (a pruned folder or a run folder) as ``format`` to ``output``.

    Returns:
        The path written and notes for the user (layout choices that matter when serving it).

    Raises:
        ExportError: the model cannot be written in that format (the message says why), before anything is written.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    output = Path(output).expanduser()
    if output.exists() and not overwrite and (output.is_file() or any(output.iterdir())):
        raise ExportError(f"{output} exists; choose another path or pass --overwrite")
    preflight(path, format, outtype=outtype)
    source = load_source(path)
    if format == "decilm":
        from finercut.export.decilm import write_decilm

        notes = ["vLLM: serve with --trust-remote-code (it reads block_configs through the configuration_decilm.py "
                 "written next to the weights; no modeling code is shipped)"]
        attention_only = [b.index for b in source.blocks if b.attention and not b.ffn]
        if attention_only:
            notes.append(f"llama.cpp: use `finercut export --format gguf` rather than convert_hf_to_gguf.py, which "
                         f"writes FFN width 0 for blocks {attention_only}; llama.cpp's deci graph skips such a layer "
                         "whole, its attention included")
        return write_decilm(source, output, overwrite=overwrite), notes
    from finercut.export.gguf import write_gguf

    return write_gguf(source, output, outtype=outtype, overwrite=overwrite)


def preflight(path: str | Path, format: str, *, outtype: str = "f32") -> None:
    """Refuse, from the pruned folder's config.json alone (before reading any weights), what ``format`` cannot hold."""
    from finercut.checkpoint import read_pruned_config
    from finercut.pruned_modeling import LAYOUT_KEY

    config = read_pruned_config(pruned_model_folder(path))
    blocks = kept_block_list(getattr(config, LAYOUT_KEY))
    check_llama_family(config, blocks, format)
    if format == "decilm":
        from finercut.checkpoint import dense_config
        from finercut.export.decilm import ffn_mult_for

        if outtype != "f32":
            raise ExportError("--outtype applies to --format gguf; a DeciLM folder keeps the pruned model's dtype")
        dense = dense_config(config)
        ffn_mult_for(dense.intermediate_size, dense.hidden_size)
    else:
        from finercut.export.gguf import check_gguf_settings

        check_gguf_settings(config, outtype)


__all__ = ["ExportError", "FORMATS", "export_model", "preflight"]
