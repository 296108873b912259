# Every field of StepStone::handshake for the six cases of the recording in
# Traces/README.md (direct, Karn, RST, unanswered, IPv6, first ACK with data),
# with the uid tied to conn.log. Checked on Zeek 8.0.10 and 7.0.11. The
# direct case (port 23) comes out app_wait (5 s) after its ACK (app.zeek).
#
# @TEST-EXEC: zeek -b -r $TRACES/handshakes.pcap $PACKAGE base/protocols/conn %INPUT > output
# @TEST-EXEC: btest-diff output
# @TEST-EXEC: zeek-cut uid id.orig_h history < conn.log | sort > conn.cut
# @TEST-EXEC: btest-diff conn.cut

# Set, not added to: zkg runs this suite after its build step wrote the
# operator's settings into site.zeek, which the package loads.
redef StepStone::darknet_subnets = {
	198.18.0.0/15,
	[2001:db8:ffff::]/48
};
redef StepStone::websocket_port = 0/tcp;

function secs(i: interval): string
	{
	return fmt("%.6f", interval_to_double(i));
	}

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	local synacks = "";
	for ( i in h$synacks )
		synacks += ( i == 0 ? "" : "," ) + secs(h$synacks[i]);

	print fmt("%s %s %s/%s -> %s/%s", h$uid, secs(h$syn_epoch), h$orig_h,
	    port_to_count(h$orig_p), h$resp_h, port_to_count(h$resp_p));
	print fmt("    ts=%.6f synack_count=%d synacks=[%s] reply=%s reply_epoch=%s tp=%s",
	    h$ts, h$synack_count, synacks, h$reply == "" ? "(none)" : h$reply,
	    h?$reply_epoch ? secs(h$reply_epoch) : "-", h?$tp ? secs(h$tp) :
	    "-");
	print fmt("    syn=%d bytes dlt=%d encap=%s l3=%s vlan=%s inner_vlan=%s eth_type=%s",
	    |decode_base64(h$syn)|, h$link_type, h$encap, h$l3, h?$vlan ? cat(
	    h$vlan) : "-", h?$inner_vlan ? cat(h$inner_vlan) : "-", h?$eth_type ?
	    fmt("0x%x", h$eth_type) : "-");
	}
