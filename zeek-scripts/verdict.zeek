##! Verdicts from the analyzer: one stepstone.log line each, and a
##! StepStone::Relay_Detected notice for relays.
##!
##! Notice fields checked against zeek/zeek
##! scripts/base/frameworks/notice/main.zeek (6.0 to 8.x): $note, $msg, $sub,
##! $src, $identifier; suppression is keyed on note + identifier, so one
##! notice per source per Notice::default_suppression_interval (1 hr).

@load base/frameworks/notice
@load ./main

module StepStone;

function ms(i: interval): string
	{
	return fmt("%.3f ms", interval_to_double(i) * 1000.0);
	}

function conditions(v: Verdict): string
	{
	if ( v$cond_os && v$cond_timing )
		return "conditions: os, timing";
	if ( v$cond_os )
		return "conditions: os";
	if ( v$cond_timing )
		return "conditions: timing";
	return "conditions: none";
	}

event StepStone::verdict(v: Verdict)
	{
	local rec = Info($ts=network_time(), $src=v$src, $relay=v$relay,
	    $cond_os=v$cond_os, $cond_timing=v$cond_timing, $samples=v$samples,
	    $reasons=v$reasons);

	if ( v?$tp_mean )
		rec$tp_mean = v$tp_mean;
	if ( v?$ta_max_mean )
		rec$ta_max_mean = v$ta_max_mean;
	if ( v?$t )
		rec$syn_ts = v$t;
	if ( v?$dst )
		rec$dst = v$dst;
	if ( v?$tp )
		rec$tp = v$tp;
	if ( v?$ping_min )
		rec$ping_min = v$ping_min;
	if ( v?$ping_avg )
		rec$ping_avg = v$ping_avg;
	if ( v?$ping_max )
		rec$ping_max = v$ping_max;
	if ( v?$fp )
		rec$fp = v$fp;
	if ( v?$fa )
		rec$fa = v$fa;

	Log::write(StepStone::LOG, rec);

	if ( ! v$relay )
		return;

	local tp_mean = v?$tp_mean ? ms(v$tp_mean) : "?";
	local ta_max_mean = v?$ta_max_mean ? ms(v$ta_max_mean) : "?";
	local tp = v?$tp ? ms(v$tp) : "?";
	local ping_max = v?$ping_max ? ms(v$ping_max) : "?";
	local fp = v?$fp ? v$fp : "unknown";
	local fa = v?$fa ? v$fa : "unknown";
	local msg = fmt("%s is a stepping stone: mean T^p %s vs mean max ping %s over %d samples; last T^p %s, max ping %s; SYN OS %s, probe OS %s",
	    v$src, tp_mean, ta_max_mean, v$samples, tp, ping_max, fp, fa);

	NOTICE([$note=Relay_Detected, $src=v$src, $msg=msg, $sub=conditions(v),
	    $identifier=cat(v$src)]);
	}
