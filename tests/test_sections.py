from mrg.text.sections import Sections, format_report, split_sections


def test_format_and_split_round_trip():
    text = format_report("The heart is normal in size.", "No acute disease.")
    assert text == "FINDINGS: The heart is normal in size.\nIMPRESSION: No acute disease."
    assert split_sections(text) == Sections("The heart is normal in size.", "No acute disease.")


def test_partial_header_is_held_back_mid_stream():
    assert split_sections("FINDINGS: Lungs are clear. IMPRES") == Sections("Lungs are clear.", "")
    assert split_sections("FINDINGS: Lungs are clear. IMPRESSION") == Sections(
        "Lungs are clear.", ""
    )
    assert split_sections("FINDINGS: Lungs are clear. IMPRESSION: Norm") == Sections(
        "Lungs are clear.", "Norm"
    )
    assert split_sections("FIND") == Sections("", "")


def test_words_that_merely_start_like_a_header_are_kept():
    assert (
        split_sections("FINDINGS: mild impre").findings == "mild impre"
    )  # lower case: not a header
    assert (
        split_sections("FINDINGS: Lungs clear, no effusion").findings == "Lungs clear, no effusion"
    )


def test_every_prefix_of_a_stream_splits_consistently():
    text = "FINDINGS: Heart size normal. Lungs clear. IMPRESSION: Normal chest."
    final = split_sections(text)
    for cut in range(len(text) + 1):
        part = split_sections(text[:cut])
        assert final.findings.startswith(part.findings)
        assert final.impression.startswith(part.impression)
        assert "IMPRES" not in part.findings.upper()


def test_text_without_headers_is_findings_and_case_is_ignored():
    assert split_sections("Heart normal.") == Sections("Heart normal.", "")
    assert split_sections("findings: a. impression: b.") == Sections("a.", "b.")
