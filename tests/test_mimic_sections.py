"""MIMIC-CXR report sectioning on the report shapes MIMIC-CXR ships, and its fallback.

The reports are written as MIMIC-CXR 2.0.0 writes them: a centred "FINAL REPORT" line, every line
indented by one space, blank lines holding one space, wet reads above a line of underscores.
"""

from fastmsd.data.mimic import extract_sections, report_text

FINAL = " " * 33 + "FINAL REPORT\n"


def report(*lines: str) -> str:
    return FINAL + "\n".join(lines) + "\n"


def test_standard_report():
    text = report(" EXAMINATION:  CHEST (PA AND LAT)", " ", " INDICATION:  ___F with ascites  // eval",
                  " ", " TECHNIQUE:  Chest PA and lateral", " ", " COMPARISON:  None.", " ", " FINDINGS: ",
                  " ", " There is no focal consolidation, pleural effusion or pneumothorax.  The",
                  " cardiomediastinal silhouette is normal.", " ", " IMPRESSION: ", " ",
                  " No acute cardiopulmonary process.")
    assert extract_sections(text) == {
        "findings": "There is no focal consolidation, pleural effusion or pneumothorax. The "
                    "cardiomediastinal silhouette is normal.",
        "impression": "No acute cardiopulmonary process."}


def test_wet_read_is_skipped():
    text = (" WET READ: ___ ___ ___ 10:04 PM\n  Patchy right basilar opacity, ?pneumonia.\n"
            " WET READ VERSION #1 ___ ___ 9:58 PM\n  Patchy opacity.\n"
            " " + "_" * 78 + "\n" + report(" EXAMINATION:  CHEST (PORTABLE AP)", " ",
                                            " FINDINGS: ", " ", " Right basilar opacity.", " ",
                                            " IMPRESSION: ", " ", " Right basilar pneumonia."))
    assert extract_sections(text) == {"findings": "Right basilar opacity.",
                                      "impression": "Right basilar pneumonia."}


def test_wet_read_then_final_report_without_sections_keeps_the_final_report():
    text = (" WET READ: ___ ___ ___ 10:04 PM\n  No pneumothorax.\n " + "_" * 78 + "\n"
            + report(" PORTABLE CHEST OF ___", " ", " The lungs are clear.  No pneumothorax."))
    assert extract_sections(text) == {"findings": "The lungs are clear. No pneumothorax.", "impression": ""}


def test_findings_and_impression_counts_as_findings():
    text = report(" INDICATION:  Cough.", " ", " FINDINGS AND IMPRESSION:", " ",
                  " Mild cardiomegaly, no effusion.", " ", " NOTIFICATION:  Called to Dr. ___.")
    assert extract_sections(text) == {"findings": "Mild cardiomegaly, no effusion.", "impression": ""}


def test_only_impression():
    text = report(" EXAMINATION:  CHEST (PA AND LAT)", " ", " COMPARISON:  ___.", " ",
                  " IMPRESSION: ", " ", " No acute process.")
    assert extract_sections(text) == {"findings": "", "impression": "No acute process."}


def test_impression_before_findings():
    text = report(" IMPRESSION:  Small left effusion.", " ", " FINDINGS:  Blunting of the left",
                  " costophrenic angle.", " ", " RECOMMENDATION(S):  Follow-up.")
    assert extract_sections(text) == {"findings": "Blunting of the left costophrenic angle.",
                                      "impression": "Small left effusion."}


def test_other_header_names_of_mimic():
    # A header describing the study is findings, a typo of IMPRESSION is impression, a provisional
    # read is skipped, an empty FINDINGS under the title is dropped.
    text = (" PROVISIONAL FINDINGS IMPRESSION (PFI): ___ 11:45 PM\n  No pneumonia.\n" + FINAL
            + " HISTORY:  Fever.\n \n FINDINGS:\n \n PA AND LATERAL CHEST:\n \n Lungs are clear.\n"
              " \n IMPRESSON:  Normal chest.\n ADDENDUM:  Discussed with Dr. ___.\n")
    assert extract_sections(text) == {"findings": "Lungs are clear.", "impression": "Normal chest."}


def test_no_headers_falls_back_to_the_text_after_the_first_paragraph():
    # MIMIC-CXR's "last_paragraph": the first paragraph (title) goes, every later one stays.
    text = report(" PA AND LATERAL VIEWS OF THE CHEST", " ", " The heart is normal in size.",
                  " ", " No pneumothorax.")
    assert extract_sections(text) == {"findings": "The heart is normal in size. No pneumothorax.",
                                      "impression": ""}
    assert report_text(text) == "The heart is normal in size. No pneumothorax."


def test_other_sections_only_fall_back_to_the_paragraph_after_the_last_one():
    text = report(" INDICATION:  ___M with chest pain.", " ", " COMPARISON:  ___.", " ",
                  " Heart size is normal.  Lungs are clear.")
    assert extract_sections(text) == {"findings": "Heart size is normal. Lungs are clear.", "impression": ""}


def test_other_sections_only_without_a_paragraph_fall_back_to_comparison():
    text = report(" INDICATION:  Chest pain.", " COMPARISON:  ___.  Heart size is normal.",
                  " TECHNIQUE:  PA view.")
    assert extract_sections(text)["findings"] == "___. Heart size is normal."


def test_one_paragraph_without_sections_is_kept_whole():
    assert extract_sections("sin hallazgos patologicos relevantes") == {
        "findings": "sin hallazgos patologicos relevantes", "impression": ""}
    assert report_text("  WET READ: ___  no   pneumothorax ") == "WET READ: ___ no pneumothorax"
    assert extract_sections(" \n ") == {"findings": "", "impression": ""}


def test_empty_sections_fall_back():
    # Empty FINDINGS and IMPRESSION are dropped; the last section left, INDICATION, is one
    # paragraph and there is no COMPARISON: the whole report is kept.
    text = report(" INDICATION:  Line placement.", " ", " FINDINGS: ", " ", " IMPRESSION:")
    whole = "FINAL REPORT INDICATION: Line placement. FINDINGS: IMPRESSION:"
    assert extract_sections(text) == {"findings": whole, "impression": ""}
