# edgefleet attestation appraisal policy.
#
# input: the normalized claims of one verified piece of evidence
#   {
#     "tee": "sev-snp" | "tdx" | "tpm" | "dev",
#     "hardware_genuine": bool,      # chains to a vendor root / the AK is bound to a TPM
#     "debug": bool,                 # the host can debug the guest
#     "measurements": {name: hex},   # launch_measurement, mr_td, rtmrN, pcrNN, ...
#     "tcb": {name: number | string},# bootloader/tee/snp/microcode (SNP), tee_tcb_svn (TDX)
#     "report_data": hex,
#     "key_binding": hex,            # present only when it matched the expected binding
#     "signer": hex,
#     "platform": {name: value}
#   }
# data.reference: reference values from the operator's configuration
#   {
#     "allowed_tees": ["sev-snp", "tdx", "tpm"],
#     "allow_debug": false,
#     "allow_dev_attester": false,   # development fleets only (policies/dev.json)
#     "snp": {"min_tcb": {"bootloader": n, "tee": n, "snp": n, "microcode": n},
#             "launch_measurements": [hex]},     # empty: any
#     "tdx": {"mr_td": [hex],                      # empty: any
#             "allowed_tcb_status": [status]},     # Intel's names, or "unknown" when the
#                                                  # operator has no collateral; absent: any
#     "tpm": {"pcrs": {"pcr07": [hex], ...},       # each listed PCR must be one of these
#             "allow_unsafe_clock_after_reset": bool} # a quote whose clock is not safe
#                                                  # (an unclean shutdown), taken after a
#                                                  # TPM reset; absent: refused
#   }
# Output: allow (bool), and deny (set of reasons) when it is false.
package edgefleet.attestation

import rego.v1

default allow := false

allow if {
	input.tee
	count(deny) == 0
}

deny contains msg if {
	not input.tee in data.reference.allowed_tees
	msg := sprintf("evidence kind %v is not allowed", [input.tee])
}

deny contains "evidence does not chain to a hardware root of trust" if {
	not input.hardware_genuine
	not dev_attester_allowed
}

# The software `dev` attester proves nothing about hardware; only a development
# reference set that names it in allowed_tees and sets allow_dev_attester admits it.
dev_attester_allowed if {
	input.tee == "dev"
	data.reference.allow_dev_attester == true
}

deny contains "debugging is enabled" if {
	input.debug
	not data.reference.allow_debug
}

deny contains "evidence is not bound to the expected nonce and key" if {
	not input.key_binding
}

deny contains msg if {
	input.tee == "sev-snp"
	some component, minimum in data.reference.snp.min_tcb
	input.tcb[component] < minimum
	msg := sprintf("SNP %s SPL %v is below the minimum %v", [component, input.tcb[component], minimum])
}

deny contains "SNP launch measurement is not an allowed one" if {
	input.tee == "sev-snp"
	count(data.reference.snp.launch_measurements) > 0
	not input.measurements.launch_measurement in data.reference.snp.launch_measurements
}

deny contains "TDX MRTD is not an allowed one" if {
	input.tee == "tdx"
	count(data.reference.tdx.mr_td) > 0
	not input.measurements.mr_td in data.reference.tdx.mr_td
}

deny contains msg if {
	input.tee == "tdx"
	allowed := data.reference.tdx.allowed_tcb_status
	not input.tcb.tcb_status in allowed
	msg := sprintf("TDX TCB status %v is not an allowed one", [input.tcb.tcb_status])
}

deny contains msg if {
	input.tee == "tpm"
	some pcr, allowed in data.reference.tpm.pcrs
	not input.measurements[pcr] in allowed
	msg := sprintf("TPM %s is not an allowed value", [pcr])
}

# After a power cut the TPM's clock is not "safe" until it next saves it; the verifier
# lets such a quote through only when the reset count rose past the previous quote's
# (platform.clock_safe false). The reference decides whether that is allowed.
deny contains "TPM clock is not safe after an unclean shutdown" if {
	input.tee == "tpm"
	input.platform.clock_safe == false
	not data.reference.tpm.allow_unsafe_clock_after_reset == true
}
