-- OsteoGate auto-routing for Orthanc (deploy/orthanc/; tested by tests/test_orthanc_recipe.py).
--
-- When a study is stable (no new instance for StableAge seconds), forward its knee and spine
-- CR/DX series to the DICOM modality "OSTEOGATE" (DicomModalities in orthanc.json). OsteoGate
-- sends its results (the SR and the result card, Manufacturer "OsteoGate") back into the same
-- study; those series are never forwarded. A series is forwarded again only when it has grown
-- since (new images: OsteoGate then makes a new result version), so our results arriving, which
-- makes the study stable once more, send nothing.
--
-- A series counts as forwarded only once its job succeeded. A forward that fails (OsteoGate
-- down or restarting) is resubmitted by this script after a wait that doubles from
-- OsteoGateRetrySeconds (orthanc.json, default 10) up to 60 s, for as long as it fails: no one
-- has to resubmit it by hand. Each failed attempt logs one line. Where Orthanc calls OnHeartBeat
-- (1.11.2 and later, LuaHeartBeatPeriod in orthanc.json: the compose image) the wait is a due
-- time checked at each heartbeat and nothing blocks. Orthanc 1.10 (Debian 12) has no timer for
-- Lua, so there the wait holds this script's event thread; other Lua events wait meanwhile, which
-- only happens while the gateway is unreachable. Jobs pending when Orthanc restarts are not
-- retried: resubmit those from Orthanc Explorer's Jobs page or POST /jobs/<id>/resubmit.)

local TARGET = 'OSTEOGATE'                 -- key of the gateway in DicomModalities
local OWN_MANUFACTURER = 'OsteoGate'       -- Manufacturer of OsteoGate's SR and result card
local MARK = 'OsteoGateForwarded'          -- series metadata (declared in UserMetadata)
local MODALITIES = { CR = true, DX = true }
-- BodyPartExamined defined terms (PS3.16 Annex L) OsteoGate assesses; the gateway decides
-- again from the full header (gateway/region.py), this only keeps other films at home.
local BODY_PARTS = {
  KNEE = true, SPINE = true, CSPINE = true, TSPINE = true, LSPINE = true, SSPINE = true,
  TLSPINE = true, LUMBARSPINE = true,
}
-- Without BodyPartExamined: words in the series or study description.
local KEYWORDS = { 'knee', 'spine', 'lumbar', 'thoracic', 'vertebra' }

local function clean(value)
  return ((value or ''):gsub('^%s+', ''):gsub('%s+$', ''))
end

local function in_scope(series, study)
  local tags = series['MainDicomTags']
  if clean(tags['Manufacturer']) == OWN_MANUFACTURER then
    return false
  end
  if not MODALITIES[clean(tags['Modality']):upper()] then
    return false
  end
  local part = clean(tags['BodyPartExamined']):upper():gsub(' ', '')
  if part ~= '' then
    return BODY_PARTS[part] == true
  end
  local text = (clean(tags['SeriesDescription']) .. ' ' ..
                clean(study['MainDicomTags']['StudyDescription'])):lower()
  for _, word in ipairs(KEYWORDS) do
    if text:find(word, 1, true) then
      return true
    end
  end
  return false
end

local CONFIG = GetOrthancConfiguration()
local RETRY_FIRST = tonumber(CONFIG['OsteoGateRetrySeconds']) or 10
local RETRY_MAX = 60
-- Jobs this script submitted and has not seen succeed: job ID -> { counts = {seriesId = n}, attempts }.
local PENDING = {}
-- Series in one of those jobs, with the instance count sent: not forwarded a second time meanwhile.
local IN_FLIGHT = {}
-- Failed jobs waiting for their next attempt (heartbeat Orthanc only): job ID -> os.time() due.
local DUE = {}
-- Set at the first OnHeartBeat: from then on a wait is a due time, not a sleep.
local HAS_HEARTBEAT = false

local function forwarded_count(seriesId)
  -- The list of the series' metadata names, then the value only when present: asking for an
  -- absent one is an HTTP 404 that Orthanc logs as an error on every first forward.
  local names = ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata'))
  for _, name in ipairs(names) do
    if name == MARK then
      return RestApiGet('/series/' .. seriesId .. '/metadata/' .. MARK)
    end
  end
  return ''
end

function OnStableStudy(studyId, tags, metadata)
  local study = ParseJson(RestApiGet('/studies/' .. studyId))
  local resources = {}
  local counts = {}
  for _, seriesId in ipairs(study['Series']) do
    local series = ParseJson(RestApiGet('/series/' .. seriesId))
    if in_scope(series, study) then
      local count = tostring(#series['Instances'])
      if forwarded_count(seriesId) ~= count and IN_FLIGHT[seriesId] ~= count then
        table.insert(resources, seriesId)
        counts[seriesId] = count
      end
    end
  end
  if #resources > 0 then
    -- Asynchronous: a job, so a slow peer never blocks Orthanc's Lua engine.
    local job = ParseJson(RestApiPost('/modalities/' .. TARGET .. '/store',
      DumpJson({ Resources = resources, Asynchronous = true }, true)))
    PENDING[job['ID']] = { counts = counts, attempts = 0 }
    for seriesId, count in pairs(counts) do
      IN_FLIGHT[seriesId] = count
    end
    print('OsteoGate: forwarding ' .. #resources .. ' series of study ' .. studyId ..
          ' (job ' .. job['ID'] .. ')')
  end
end

function OnJobSuccess(jobId)
  local pending = PENDING[jobId]
  if pending == nil then
    return
  end
  PENDING[jobId] = nil
  for seriesId, count in pairs(pending.counts) do
    -- Marked now, not at submission: a forward that failed is never taken as done.
    RestApiPut('/series/' .. seriesId .. '/metadata/' .. MARK, count)
    IN_FLIGHT[seriesId] = nil
  end
  if pending.attempts > 0 then
    print('OsteoGate: forward job ' .. jobId .. ' succeeded after ' .. pending.attempts .. ' retries')
  end
end

function OnJobFailure(jobId)
  local pending = PENDING[jobId]
  if pending == nil then
    return
  end
  pending.attempts = pending.attempts + 1
  local wait = math.min(RETRY_MAX, RETRY_FIRST * 2 ^ math.min(pending.attempts - 1, 10))
  print(string.format('OsteoGate: forward job %s failed (attempt %d; is the gateway up?): retrying in %g s',
                      jobId, pending.attempts, wait))
  if HAS_HEARTBEAT then
    DUE[jobId] = os.time() + wait
    return
  end
  os.execute('sleep ' .. string.format('%g', wait))
  RestApiPost('/jobs/' .. jobId .. '/resubmit', '')
end

function OnHeartBeat()
  HAS_HEARTBEAT = true
  local now = os.time()
  for jobId, due in pairs(DUE) do
    if due <= now then
      DUE[jobId] = nil
      RestApiPost('/jobs/' .. jobId .. '/resubmit', '')
    end
  end
end
